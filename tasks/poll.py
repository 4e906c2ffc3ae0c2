"""One poll of one connection: fetch, diff against watermarks, commit events and watermarks.

This is the orchestrator of the poll; the diff itself is pure (:mod:`tasks.diff`,
:mod:`tasks.rooms_diff`) and the events are built by :mod:`tasks.events`.

Per poll, for each watched room, the room's history is fetched **once** whatever the number
of triggers on it; the participant list once per room with enter/exit triggers; the room
list once (every page) when a room-list trigger exists. Each room's new events, its
watermark advance and the priming of its subscriptions are committed in **one
transaction**; the caller enqueues delivery of the returned event ids only after that.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage import connections as conns
from storage import outbox, watermarks
from storage import rooms as room_store
from storage import subscriptions as subs
from storage.models import ROOM_LIST_ROOM_ID, STREAM_PARTICIPANTS, STREAM_ROOMS
from storage.outbox import NewEvent
from storage.rooms import ParticipantSnapshot, RoomSnapshot
from tasks import diff, events
from tasks.client import HipChatClient
from tasks.errors import (
    AuthFailed,
    BadRequest,
    Forbidden,
    MalformedResponse,
    NotFound,
)
from tasks.filters import compile_filter
from tasks.hipchat_types import Message, Room
from tasks.rooms_diff import RoomState, diff_participants, diff_rooms
from tasks.runtime import Runtime
from tasks.subscribe import HISTORY_EVENTS, PARTICIPANT_EVENTS, ROOM_LIST_EVENTS
from tasks.subscriptions_api import SubView

log = logging.getLogger(__name__)

HISTORY = "history"


@dataclass
class PollResult:
    connection_id: int
    skipped: str | None = None
    # subscription id -> ids of the outbox events this poll committed for it
    dispatch: dict[int, list[int]] = field(default_factory=dict)
    rooms_polled: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.problems:
            return f"{self.event_count} events; " + "; ".join(self.problems)[:500]
        return f"ok: {self.event_count} events"

    @property
    def event_count(self) -> int:
        return sum(len(ids) for ids in self.dispatch.values())


@dataclass(frozen=True, slots=True)
class ConnView:
    id: int
    name: str
    base_url: str

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


class Poll:
    """The state of one poll: the connection, its client, and what has been found."""

    def __init__(self, rt: Runtime, conn: ConnView, client: HipChatClient, now: datetime) -> None:
        self.rt, self.conn, self.client, self.now = rt, conn, client, now
        self.result = PollResult(conn.id)

    # -- history triggers ------------------------------------------------------------
    def poll_history(self, by_room: dict[int, list[SubView]]) -> None:
        for room_id, room_subs in by_room.items():
            try:
                self._poll_room_history(room_id, room_subs)
            except NotFound:
                self._room_gone(room_id, room_subs)
            except MalformedResponse as exc:
                # The watermark stays where it was; the next poll tries again.
                self.result.problems.append(f"room {room_id}: {exc}")
                log.warning(
                    "poll conn=%s room=%s: malformed response: %s", self.conn.id, room_id, exc
                )

    def _poll_room_history(self, room_id: int, room_subs: list[SubView]) -> None:
        page = self.rt.settings.history_page_size
        mark = self._watermark(room_id, HISTORY)
        new_events: list[NewEvent] = []
        if mark is None:
            want = max([s.backfill for s in room_subs] + [1])
            items = self.client.latest_history(room_id, max_results=min(want, 1000))
            new_mark = diff.prime_watermark(items)
            for sub in room_subs:
                if sub.backfill:
                    new_events += self._history_events(
                        sub, diff.backfill_items(items, sub.backfill)
                    )
        else:
            new_items = self._fetch_new(room_id, mark, page)
            last_id, last_date = mark
            new_mark = diff.next_watermark(
                (last_id, last_date) if last_id is not None else None, new_items
            )
            for sub in room_subs:
                if sub.primed:
                    new_events += self._history_events(sub, new_items)
                elif sub.backfill:
                    recent = self.client.latest_history(room_id, max_results=sub.backfill)
                    new_events += self._history_events(
                        sub, diff.backfill_items(recent, sub.backfill)
                    )
        self.result.rooms_polled += 1
        self._commit(room_id, HISTORY, new_mark, new_events, [s for s in room_subs if not s.primed])

    def _fetch_new(
        self, room_id: int, mark: tuple[str | None, datetime], page: int
    ) -> list[Message]:
        last_id, last_date = mark
        if last_id is None:  # primed on an empty room: everything is new
            return diff.diff_latest(
                self.client.latest_history(room_id, max_results=page), None, page_size=page
            ).new
        try:
            items = self.client.latest_history(room_id, not_before=last_id, max_results=page)
        except BadRequest:
            # The watermark message is gone (deleted); fall back to dates.
            log.info(
                "poll conn=%s room=%s: not-before unknown, paging by date", self.conn.id, room_id
            )
            items = []
            found = diff.LatestDiff(new=[], watermark_found=False, gap=True)
        else:
            found = diff.diff_latest(items, last_id, page_size=page, watermark_date=last_date)
            if not found.gap:
                return found.new
        newest = items[0].date if items else self.now
        pages = self._history_back(room_id, newest, last_date)
        return diff.merge_gap(pages, items, last_id, last_date)

    def _history_back(
        self, room_id: int, newest: datetime, oldest: datetime
    ) -> Iterable[list[Message]]:
        return self.client.iter_history(room_id, date=newest, end_date=oldest)

    def _history_events(self, sub: SubView, items: list[Message]) -> list[NewEvent]:
        matcher = compile_filter(sub.filter) if sub.filter else None
        found = []
        for msg in items:
            if diff.classify(msg) != sub.event:
                continue
            matches: list[str] | None = None
            if matcher is not None:
                matches = matcher.match(msg.text)
                if matches is None:
                    continue
            payload = events.message_event(
                sub.event,
                msg,
                self._room_stub(sub),
                connection=self.conn.summary(),
                subscription=sub.summary(),
                matches=matches,
            )
            found.append(self._new_event(sub, payload))
        return found

    # -- participant triggers -----------------------------------------------------------
    def poll_participants(self, by_room: dict[int, list[SubView]]) -> None:
        for room_id, room_subs in by_room.items():
            try:
                current = self.client.participants(room_id)
            except NotFound:
                self._room_gone(room_id, room_subs)
                continue
            found: list[NewEvent] = []
            with self.rt.db.session() as s:
                known = room_store.known_participants(s, self.conn.id, room_id)
                generation = _generation(s, self.conn.id, room_id, STREAM_PARTICIPANTS)
            if generation is not None:
                entered, exited = diff_participants(
                    {
                        uid: {"id": uid, "name": p.name, "mention_name": p.mention_name}
                        for uid, p in known.items()
                    },
                    current,
                )
                for sub in (x for x in room_subs if x.primed):
                    people = entered if sub.event == "room_enter" else exited
                    found += [self._participant_event(sub, user, generation) for user in people]
            self.result.rooms_polled += 1
            with self.rt.db.session() as s:
                room_store.replace_participants(
                    s,
                    self.conn.id,
                    room_id,
                    [ParticipantSnapshot.of(u) for u in current],
                    at=self.now,
                )
                self._store(s, found, [x for x in room_subs if not x.primed])

    def _participant_event(self, sub: SubView, user: Any, generation: str) -> NewEvent:
        payload = events.participant_event(
            sub.event,
            user,
            self._room_stub(sub),
            connection=self.conn.summary(),
            subscription=sub.summary(),
            generation=generation,
        )
        return self._new_event(sub, payload)

    # -- room-list triggers -------------------------------------------------------------
    def poll_room_list(self, room_subs: list[SubView]) -> None:
        current: list[Room] = self.client.list_rooms(include_private=True, include_archived=True)
        with self.rt.db.session() as s:
            known = {
                rid: RoomState(rid, r.name, r.privacy, r.is_archived, r.topic)
                for rid, r in room_store.known_rooms(s, self.conn.id).items()
            }
            generation = _generation(s, self.conn.id, ROOM_LIST_ROOM_ID, STREAM_ROOMS)
        found: list[NewEvent] = []
        if generation is not None:
            for change in diff_rooms(known, current):
                for sub in room_subs:
                    if sub.event == change.event and sub.primed:
                        payload = events.room_event(
                            change,
                            connection=self.conn.summary(),
                            subscription=sub.summary(),
                            generation=generation,
                            base_url=self.conn.base_url,
                        )
                        found.append(self._new_event(sub, payload))
        with self.rt.db.session() as s:
            room_store.replace_known_rooms(
                s, self.conn.id, [RoomSnapshot.of(r) for r in current], at=self.now
            )
            self._store(s, found, [x for x in room_subs if not x.primed])

    # -- shared pieces --------------------------------------------------------------------
    def _watermark(self, room_id: int, stream: str) -> tuple[str | None, datetime] | None:
        with self.rt.db.session() as s:
            row = watermarks.get_watermark(s, self.conn.id, room_id, stream)
            return (row.last_id, row.last_date) if row is not None else None

    def _commit(
        self,
        room_id: int,
        stream: str,
        mark: tuple[str, datetime] | None,
        found: list[NewEvent],
        priming: list[SubView],
    ) -> None:
        with self.rt.db.session() as s:
            if mark is not None:
                watermarks.advance_watermark(s, self.conn.id, room_id, stream, mark[0], mark[1])
            else:
                watermarks.mark_empty(s, self.conn.id, room_id, stream)
            self._store(s, found, priming)

    def _store(self, s: Any, found: list[NewEvent], priming: list[SubView]) -> None:
        inserted = outbox.add_events(s, found)
        if priming:
            subs.mark_primed(s, [x.id for x in priming], self.now)
        s.flush()
        for row in inserted:
            self.result.dispatch.setdefault(row.subscription_id, []).append(row.id)

    def _new_event(self, sub: SubView, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(
            connection_id=self.conn.id,
            subscription_id=sub.id,
            idempotency_key=payload["idempotency_key"],
            event=sub.event,
            payload=payload,
        )

    def _room_stub(self, sub: SubView) -> dict[str, Any]:
        return events.room_stub(self.conn.base_url, sub.room_id or 0, sub.room or "")

    def _room_gone(self, room_id: int, room_subs: list[SubView]) -> None:
        reason = f"room {room_subs[0].room or room_id} not found"
        self.result.problems.append(reason)
        with self.rt.db.session() as s:
            for sub in room_subs:
                subs.set_subscription_state(s, sub.id, "error", reason)


def _generation(s: Any, conn_id: int, room_id: int, stream: str) -> str | None:
    """The stored snapshot's time: the same for every poll that diffs against it, so a
    redelivered or concurrent poll builds the same idempotency keys. None: not primed."""
    mark = watermarks.get_watermark(s, conn_id, room_id, stream)
    return mark.last_date.isoformat() if mark is not None else None


def load(rt: Runtime, connection_id: int) -> tuple[ConnView, str, list[SubView]] | None:
    with rt.db.session() as s:
        row = conns.get_connection(s, connection_id)
        if row is None or row.state != "active":
            return None
        token = conns.decrypt_token(row, rt.cipher)
        views = [SubView.of(x) for x in subs.active_subscriptions(s, connection_id)]
        return ConnView(row.id, row.name, row.base_url), token, views


def resolve_rooms(rt: Runtime, poll: Poll, views: list[SubView]) -> list[SubView]:
    """Give every room subscription its numeric room id (one lookup per unresolved name)."""
    resolved: dict[str, int] = {}
    out = []
    for view in views:
        if view.event in ROOM_LIST_EVENTS or view.room_id is not None:
            out.append(view)
            continue
        room = view.room or ""
        if room not in resolved:
            try:
                resolved[room] = poll.client.get_room(int(room) if room.isdigit() else room).id
            except NotFound:
                poll._room_gone(0, [view])
                continue
        with rt.db.session() as s:
            subs.set_room_id(s, view.id, resolved[room])
        out.append(_with_room_id(view, resolved[room]))
    return out


def _with_room_id(view: SubView, room_id: int) -> SubView:
    data = {f: getattr(view, f) for f in SubView.__slots__}
    data["room_id"] = room_id
    return SubView(**data)


def group_by_room(views: list[SubView], kinds: frozenset[str]) -> dict[int, list[SubView]]:
    grouped: dict[int, list[SubView]] = defaultdict(list)
    for view in views:
        if view.event in kinds and view.room_id is not None:
            grouped[view.room_id].append(view)
    return dict(grouped)


def poll_connection(rt: Runtime, connection_id: int, now: datetime | None = None) -> PollResult:
    """Poll one connection once. Raises :class:`RetryLater` subclasses for the task to retry."""
    now = now or datetime.now(UTC)
    loaded = load(rt, connection_id)
    if loaded is None:
        return PollResult(connection_id, skipped="connection missing or not active")
    conn, token, views = loaded
    if not views:
        return PollResult(connection_id, skipped="no active subscriptions")
    with rt.client(conn.id, conn.base_url, token) as client:
        poll = Poll(rt, conn, client, now)
        try:
            views = resolve_rooms(rt, poll, views)
            poll.poll_history(group_by_room(views, HISTORY_EVENTS))
            poll.poll_participants(group_by_room(views, PARTICIPANT_EVENTS))
            listing = [v for v in views if v.event in ROOM_LIST_EVENTS]
            if listing:
                poll.poll_room_list(listing)
        except (AuthFailed, Forbidden) as exc:
            with rt.db.session() as s:
                conns.set_connection_state(s, conn.id, "auth_failed", str(exc))
            log.error("poll conn=%s: %s; connection paused until resumed", conn.id, exc)
            poll.result.problems.append(str(exc))
    with rt.db.session() as s:
        conns.record_poll(s, conn.id, now, poll.result.status)
    return poll.result
