"""One poll of one connection: fetch, diff against watermarks, commit events and watermarks.

This is the orchestrator of the poll: what it reads and in which order comes from
:mod:`tasks.poll_plan`, the diff itself is pure (:mod:`tasks.diff`, :mod:`tasks.rooms_diff`)
and the events are built by :mod:`tasks.events`.

Per poll, for each watched room, the room's history is fetched **once** whatever the number
of triggers on it; the participant list once per room with enter/exit triggers; the room
list once (every page) when a room-list trigger exists. These streams are read least
recently polled first (:func:`tasks.poll_plan.plan`), so a budget that runs out mid-poll
starves none.
Each stream's new events, its watermark advance and the priming of its subscriptions are
committed in **one transaction**; the caller enqueues delivery of the returned event ids
only after that.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage import outbox, watermarks
from storage import rooms as room_store
from storage import subscriptions as subs
from storage.errors import (
    AuthFailed,
    BadRequest,
    Forbidden,
    MalformedResponse,
    NotFound,
)
from storage.outbox import NewEvent
from storage.rooms import ParticipantSnapshot, RoomSnapshot
from storage.vocabulary import ROOM_LIST_ROOM_ID, Event, Stream
from tasks import diff, events
from tasks.client import HipChatClient
from tasks.diff import HistoryMark
from tasks.filters import compile_filter
from tasks.hipchat_types import Message, Room
from tasks.poll_plan import ConnView, StreamRead, load, plan, resolve_rooms
from tasks.rooms_diff import diff_participants, diff_rooms
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView

log = logging.getLogger(__name__)


@dataclass
class PollResult:
    connection_id: int
    skipped: str | None = None
    # subscription id -> ids of the outbox events this poll committed for it
    dispatch: dict[int, list[int]] = field(default_factory=dict)
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


class Poll:
    """The state of one poll: the connection, its client, and what has been found."""

    def __init__(
        self,
        rt: Runtime,
        conn: ConnView,
        client: HipChatClient,
        now: datetime,
        result: PollResult | None = None,
    ) -> None:
        self.rt, self.conn, self.client, self.now = rt, conn, client, now
        self.result = result if result is not None else PollResult(conn.id)

    def poll_stream(self, stream: StreamRead) -> None:
        """Read one stream, diff it, commit; a room's own failures stay with that room."""
        try:
            if stream.kind == Stream.HISTORY:
                self._poll_room_history(stream.room_id, stream.subs)
            elif stream.kind == Stream.PARTICIPANTS:
                self._poll_room_participants(stream.room_id, stream.subs)
            else:
                self._poll_room_list(stream.subs)
        except NotFound:
            if stream.kind == Stream.ROOMS:
                raise  # no room to blame: the base URL is wrong
            self.room_gone(stream.room_id, stream.subs)
        except MalformedResponse as exc:  # nothing is diffed from a bad answer
            self._malformed(stream.room_id, exc)

    # -- history triggers ------------------------------------------------------------
    def _poll_room_history(self, room_id: int, room_subs: list[SubView]) -> None:
        page = self.rt.settings.history_page_size
        mark = self._watermark(room_id, Stream.HISTORY)
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
            new_mark = diff.next_watermark(mark if mark.id is not None else None, new_items)
            for sub in room_subs:
                if sub.primed:
                    new_events += self._history_events(sub, new_items)
                elif sub.backfill:
                    recent = self.client.latest_history(room_id, max_results=sub.backfill)
                    new_events += self._history_events(
                        sub, diff.backfill_items(recent, sub.backfill)
                    )
        self._commit(
            room_id, Stream.HISTORY, new_mark, new_events, [s for s in room_subs if not s.primed]
        )

    def _fetch_new(self, room_id: int, mark: HistoryMark, page: int) -> list[Message]:
        """Every item after the watermark, oldest first. A watermark without an id was
        primed on an empty room: everything since is new, which may be more than a page."""
        last_id, last_date = mark.id, mark.date
        try:
            items = self.client.latest_history(room_id, not_before=last_id, max_results=page)
        except BadRequest:
            if last_id is None:
                raise
            # The watermark message is gone (deleted); fall back to dates.
            log.info(
                "poll conn=%s room=%s: not-before unknown, paging by date", self.conn.id, room_id
            )
            items = []
        else:
            found = diff.diff_latest(items, last_id, page_size=page, watermark_date=last_date)
            # diff_latest cannot see a gap without a watermark id: a full page can.
            if not (found.gap or (last_id is None and len(items) >= page)):
                return found.new
        newest = items[0].date if items else self.now
        pages = self._history_back(room_id, newest, last_date)
        # "" sorts before every id: with no watermark id, everything after its date is new.
        return diff.merge_gap(pages, items, last_id or "", last_date)

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
    def _poll_room_participants(self, room_id: int, room_subs: list[SubView]) -> None:
        current = self.client.participants(room_id)
        # Baseline, diff, new baseline and events in one transaction, the generation read
        # first: a concurrent poll that commits meanwhile cannot pair our old generation
        # with its new baseline (see _generation).
        with self.rt.db.session() as s:
            generation = _generation(s, self.conn.id, room_id, Stream.PARTICIPANTS)
            known = room_store.known_participants(s, self.conn.id, room_id)
            found: list[NewEvent] = []
            if generation is not None:
                entered, exited = diff_participants(
                    {
                        uid: {"id": uid, "name": p.name, "mention_name": p.mention_name}
                        for uid, p in known.items()
                    },
                    current,
                )
                for sub in (x for x in room_subs if x.primed):
                    people = entered if sub.event == Event.ROOM_ENTER else exited
                    found += [self._participant_event(sub, user, generation) for user in people]
            room_store.replace_participants(
                s,
                self.conn.id,
                room_id,
                [ParticipantSnapshot.of(u) for u in current],
                at=self.now,
                known=known,
            )
            inserted = self._store(s, found, [x for x in room_subs if not x.primed])
        self._committed(inserted)

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
    def _poll_room_list(self, room_subs: list[SubView]) -> None:
        current: list[Room] = self.client.list_rooms(include_private=True, include_archived=True)
        with self.rt.db.session() as s:  # one transaction, generation first: see above
            generation = _generation(s, self.conn.id, ROOM_LIST_ROOM_ID, Stream.ROOMS)
            stored = room_store.known_rooms(s, self.conn.id)
            known = {rid: room_store.room_snapshot(row) for rid, row in stored.items()}
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
            room_store.replace_known_rooms(
                s, self.conn.id, [RoomSnapshot.of(r) for r in current], at=self.now, known=stored
            )
            inserted = self._store(s, found, [x for x in room_subs if not x.primed])
        self._committed(inserted)

    # -- shared pieces --------------------------------------------------------------------
    def _watermark(self, room_id: int, stream: str) -> HistoryMark | None:
        with self.rt.db.session() as s:
            row = watermarks.get_watermark(s, self.conn.id, room_id, stream)
            return HistoryMark(row.last_id, row.last_date) if row is not None else None

    def _commit(
        self,
        room_id: int,
        stream: str,
        mark: HistoryMark | None,
        found: list[NewEvent],
        priming: list[SubView],
    ) -> None:
        # Still empty: (None, EMPTY_DATE) says "looked, saw nothing"; the advance also
        # refreshes updated_at, which orders the streams of the next poll (see poll_plan).
        mark = mark or HistoryMark(None, watermarks.EMPTY_DATE)
        with self.rt.db.session() as s:
            watermarks.advance_watermark(s, self.conn.id, room_id, stream, mark.id, mark.date)
            inserted = self._store(s, found, priming)
        self._committed(inserted)

    def _store(
        self, s: Session, found: list[NewEvent], priming: list[SubView]
    ) -> list[tuple[int, int]]:
        """Write events and priming marks; (subscription id, event id) of each new event."""
        inserted = outbox.add_events(s, found)
        if priming:
            subs.mark_primed(s, [x.id for x in priming], self.now)
        s.flush()
        return [(row.subscription_id, row.id) for row in inserted]

    def _committed(self, inserted: list[tuple[int, int]]) -> None:
        # Only after the transaction committed: a rolled-back event must never be dispatched.
        for subscription_id, event_id in inserted:
            self.result.dispatch.setdefault(subscription_id, []).append(event_id)

    def _malformed(self, room_id: int, exc: MalformedResponse) -> None:
        # Nothing was diffed or committed: the watermark or snapshot stays where it was and
        # the next poll tries again.
        self.result.problems.append(f"room {room_id}: {exc}")
        log.warning("poll conn=%s room=%s: malformed response: %s", self.conn.id, room_id, exc)

    def _new_event(self, sub: SubView, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(
            connection_id=self.conn.id,
            subscription_id=sub.id,
            idempotency_key=payload["idempotency_key"],
            event=sub.event,
            payload=payload,
        )

    def _room_stub(self, sub: SubView) -> dict[str, Any]:
        return events.room_stub(
            self.conn.base_url, sub.room_id or 0, sub.room_name or sub.room or ""
        )

    def room_gone(self, room_id: int, room_subs: list[SubView]) -> None:
        """The room is not on HipChat: its subscriptions go to ``error`` with the reason."""
        reason = f"room {room_subs[0].room or room_id} not found"
        self.result.problems.append(reason)
        with self.rt.db.session() as s:
            for sub in room_subs:
                subs.set_subscription_state(s, sub.id, "error", reason)


def _generation(s: Session, conn_id: int, room_id: int, stream: str) -> str | None:
    """The stored snapshot's time: the same for every poll that diffs against it, so a
    redelivered or concurrent poll builds the same idempotency keys. None: not primed.

    Read it first, in the transaction that stores the new baseline: a poll committing in
    between can then at worst pair its newer baseline with the older generation, never the
    older baseline with its newer generation (which would fire its events again under new
    keys). The poll lease keeps polls of one connection from overlapping in the first place."""
    mark = watermarks.get_watermark(s, conn_id, room_id, stream)
    return mark.last_date.isoformat() if mark is not None else None


def poll_connection(
    rt: Runtime,
    connection_id: int,
    now: datetime | None = None,
    *,
    result: PollResult | None = None,
    done_since: datetime | None = None,
) -> PollResult:
    """Poll one connection once. Raises :class:`RetryLater` subclasses for the task to retry.

    Streams are committed one by one, so a poll that raises may already have committed
    events: pass ``result`` to still see them in ``result.dispatch`` then, and on the retry
    pass ``done_since`` (the first attempt's start) to skip what it did (see :func:`plan`).
    """
    now = now or datetime.now(UTC)
    result = result if result is not None else PollResult(connection_id)
    loaded = load(rt, connection_id)
    if loaded is None:
        result.skipped = "connection missing or not active"
        return result
    conn, token, views = loaded
    if not views:
        result.skipped = "no active subscriptions"
        return result
    with rt.client(conn.id, conn.base_url, token) as client:
        poll = Poll(rt, conn, client, now, result)
        try:
            views = resolve_rooms(rt, client, views, lambda view: poll.room_gone(0, [view]))
            for stream in plan(rt, conn.id, views, done_since):
                poll.poll_stream(stream)
        except (AuthFailed, Forbidden) as exc:
            with rt.db.session() as s:
                conns.set_connection_state(s, conn.id, "auth_failed", str(exc))
            log.error("poll conn=%s: %s; connection paused until resumed", conn.id, exc)
            poll.result.problems.append(str(exc))
    with rt.db.session() as s:
        conns.record_poll(s, conn.id, now, poll.result.status)
    return poll.result
