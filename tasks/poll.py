"""One poll of one connection: fetch, diff against watermarks, commit events and watermarks.

This is the orchestrator of the poll: what it reads and in which order comes from
:mod:`tasks.poll_plan`, the diff itself is pure (:mod:`tasks.diff`, :mod:`tasks.rooms_diff`)
and the events are built by :mod:`tasks.events`.

Per poll, for each watched room, the room's history is fetched **once** whatever the number
of triggers on it; the participant list once per room with enter/exit triggers; the room
list once (every page) when a room-list trigger exists.

* **The quiet path is the hot path.** The database is read once (:func:`tasks.poll_plan.load`)
  and written only when a stream changed: new items, a changed participant list or room list,
  a subscription to prime. The poll's own bookkeeping goes to :class:`tasks.health.HealthBook`,
  written in batches.
* **Each stream commits alone**: its new events, its watermark or snapshot and the priming of
  its subscriptions in one transaction. The caller enqueues delivery of the returned event
  ids only after that.
* **A room's failure stays with that room.** A 5xx, a timeout or a malformed answer of one
  room is recorded in the connection's health and that room is retried on its own after a
  growing wait (:mod:`tasks.health`); every other room is still read. What stops the whole
  poll is what concerns the whole connection: the budget, a 429, a bad token, storage down.
* **No reply loops.** Messages and notifications the connection itself posted
  (:mod:`tasks.posts`) fire no subscription unless it asks for them (``include_own``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from storage import connections as conns
from storage import outbox, watermarks
from storage import subscriptions as subs
from storage.errors import (
    AuthFailed,
    BadRequest,
    BucketEmpty,
    Forbidden,
    MalformedResponse,
    NotFound,
    RateLimited,
    RetryLater,
    ServerError,
    TransportError,
)
from storage.health import Health
from storage.outbox import NewEvent
from storage.vocabulary import ROOM_LIST_ROOM_ID, Stream
from tasks import diff, events, health, metrics, posts
from tasks.client import HipChatClient
from tasks.diff import HistoryMark
from tasks.filters import compile_filter
from tasks.hipchat_types import Message
from tasks.poll_plan import ConnView, PollState, StreamRead, load, plan, resolve_rooms
from tasks.poll_snapshots import poll_participants, poll_room_list
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView

log = logging.getLogger(__name__)

# Failures of one room (or of the room list) that leave the other rooms to be read.
ROOM_FAILURES = (ServerError, TransportError, MalformedResponse)


@dataclass
class PollResult:
    connection_id: int
    skipped: str | None = None
    # subscription id -> ids of the outbox events this poll committed for it
    dispatch: dict[int, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)  # streams read (see StreamRead.key)
    failing: dict[int, str] = field(default_factory=dict)  # room id -> its error, this poll
    waiting: list[int] = field(default_factory=list)  # failing rooms not tried this time
    come_back: float | None = None  # seconds until a room failing now is due again

    @property
    def status(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        failing = [f"room {room}: {error}" for room, error in self.failing.items()]
        failing += [f"room {room}: backing off" for room in self.waiting]
        if failing or self.problems:
            head = "failing" if failing else f"{self.event_count} events"
            return f"{head}; {'; '.join(failing + self.problems)}"[:500]
        return f"ok: {self.event_count} events"

    @property
    def event_count(self) -> int:
        return sum(len(ids) for ids in self.dispatch.values())


class Poll:
    """The state of one poll: the connection, its client, what was read and what was found."""

    def __init__(
        self,
        rt: Runtime,
        state: PollState,
        client: HipChatClient,
        now: datetime,
        result: PollResult,
    ) -> None:
        self.rt, self.state, self.client, self.now, self.result = rt, state, client, now, result
        self.conn: ConnView = state.conn

    def poll_stream(self, stream: StreamRead) -> None:
        """Read one stream, diff it, commit what changed. A room HipChat no longer knows puts
        its subscriptions in ``error``."""
        try:
            if stream.kind == Stream.HISTORY:
                self._poll_room_history(stream.room_id, stream.subs)
            elif stream.kind == Stream.PARTICIPANTS:
                poll_participants(self, stream.room_id, stream.subs)
            else:
                poll_room_list(self, stream.subs)
        except NotFound:
            if stream.kind == Stream.ROOMS:
                raise  # no room to blame: the base URL is wrong
            self.room_gone(stream.room_id, stream.subs)

    # -- history triggers ------------------------------------------------------------
    def _poll_room_history(self, room_id: int, room_subs: list[SubView]) -> None:
        page = self.rt.settings.history_page_size
        mark = self.state.marks.get((room_id, Stream.HISTORY))
        priming = [s for s in room_subs if not s.primed]
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
            own = self._own(room_subs, new_items)
            for sub in room_subs:
                if sub.primed:
                    new_events += self._history_events(sub, new_items, own)
                elif sub.backfill:
                    recent = self.client.latest_history(room_id, max_results=sub.backfill)
                    new_events += self._history_events(
                        sub, diff.backfill_items(recent, sub.backfill)
                    )
            if not new_items and not priming:
                return  # nothing changed: nothing to write
        self._commit(room_id, Stream.HISTORY, new_mark, new_events, priming)

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

    def _own(self, room_subs: Sequence[SubView], items: Sequence[Message]) -> set[str]:
        """The ids of the items the connection posted itself, when a subscription cares."""
        if all(s.include_own for s in room_subs):
            return set()
        keys = {_post_key(m): m.id for m in items if m.type in ("message", "notification")}
        if not keys:
            return set()
        return {keys[k] for k in self.rt.posts.own(self.conn.id, keys)}

    def _history_events(
        self, sub: SubView, items: list[Message], own: set[str] | None = None
    ) -> list[NewEvent]:
        matcher = compile_filter(sub.filter) if sub.filter else None
        found = []
        for msg in items:
            if diff.classify(msg) != sub.event:
                continue
            if own and msg.id in own and not sub.include_own:
                continue
            matches: list[str] | None = None
            if matcher is not None:
                matches = matcher.match(msg.text)
                if matches is None:
                    continue
            payload = events.message_event(
                sub.event,
                msg,
                self.room_stub(sub),
                connection=self.conn.summary(),
                subscription=sub.summary(),
                matches=matches,
            )
            found.append(self.new_event(sub, payload))
        return found

    # -- shared pieces --------------------------------------------------------------------
    def _commit(
        self,
        room_id: int,
        stream: str,
        mark: HistoryMark | None,
        found: list[NewEvent],
        priming: list[SubView],
    ) -> None:
        # Still empty: (None, EMPTY_DATE) says "looked, saw nothing".
        mark = mark or HistoryMark(None, watermarks.EMPTY_DATE)
        with self.rt.db.session() as s:
            watermarks.advance_watermark(s, self.conn.id, room_id, stream, mark.id, mark.date)
            inserted = self.store(s, found, priming)
        self.committed(inserted)

    def store(
        self, s: Session, found: list[NewEvent], priming: list[SubView]
    ) -> list[tuple[int, int]]:
        """Write events and priming marks; (subscription id, event id) of each new event."""
        inserted = outbox.add_events(s, found)
        metrics.detection_lag_on_commit(s, inserted)
        if priming:
            subs.mark_primed(s, [x.id for x in priming], self.now)
        s.flush()
        return [(row.subscription_id, row.id) for row in inserted]

    def committed(self, inserted: list[tuple[int, int]]) -> None:
        # Only after the transaction committed: a rolled-back event must never be dispatched.
        for subscription_id, event_id in inserted:
            self.result.dispatch.setdefault(subscription_id, []).append(event_id)

    def new_event(self, sub: SubView, payload: dict[str, Any]) -> NewEvent:
        return NewEvent(
            connection_id=self.conn.id,
            subscription_id=sub.id,
            idempotency_key=payload["idempotency_key"],
            event=sub.event,
            payload=payload,
        )

    def room_stub(self, sub: SubView) -> dict[str, Any]:
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


def _post_key(msg: Message) -> str:
    if msg.type == "notification":
        label = msg.raw.get("from")
        return posts.notification_key(msg.text, label if isinstance(label, str) else None)
    return posts.message_key(msg.id)


def poll_connection(
    rt: Runtime,
    connection_id: int,
    now: datetime | None = None,
    *,
    result: PollResult | None = None,
    done: Iterable[str] = (),
) -> PollResult:
    """Poll one connection once. Raises :class:`RetryLater` subclasses for the task to retry
    when the whole connection must wait (the budget, a 429, storage down).

    Streams are committed one by one, so a poll that raises may already have committed
    events: pass ``result`` to still see them in ``result.dispatch`` then, and on the retry
    pass ``done`` (``result.done`` of the earlier attempts) to skip what they read.
    """
    now = now or datetime.now(UTC)
    result = result if result is not None else PollResult(connection_id)
    state = load(rt, connection_id)
    if state is None:
        result.skipped = "connection missing or not active"
        return result
    if not state.views:
        result.skipped = "no active subscriptions"
        return result
    conn = state.conn
    watched = {v.room_id or ROOM_LIST_ROOM_ID for v in state.views}
    record = health.forget_rooms(state.health, watched)
    streams: list[StreamRead] = []
    position = 0  # the stream being read: where a poll that must wait stopped
    with rt.client(conn.id, conn.base_url, state.token) as client:
        poll = Poll(rt, state, client, now, result)
        try:
            views = resolve_rooms(rt, client, state.views, lambda view: poll.room_gone(0, [view]))
            streams = plan(views, record.behind, set(done))
            for position, stream in enumerate(streams):  # noqa: B007 (read on a wait)
                if health.backing_off(record, stream.room_id, now):
                    result.waiting.append(stream.room_id)
                    continue
                try:
                    poll.poll_stream(stream)
                except ROOM_FAILURES as exc:
                    record = health.room_failed(record, stream.room_id, exc, now)
                    result.failing[stream.room_id] = str(exc)
                    log.warning("poll conn=%s room=%s failed: %s", conn.id, stream.room_id, exc)
                    continue
                record = health.room_ok(record, stream.room_id)
                result.done.append(stream.key)
        except (AuthFailed, Forbidden) as exc:
            with rt.db.session() as s:
                conns.set_connection_state(s, conn.id, "auth_failed", str(exc))
            log.error("poll conn=%s: %s; connection paused until resumed", conn.id, exc)
            result.problems.append(str(exc))
            _record(
                rt,
                state.health,
                health.finished(record, now, result.status, failed=True, behind=[]),
            )
            return result
        except (RetryLater, SoftTimeLimitExceeded) as exc:
            # The whole connection waits (budget, 429), cannot be served (storage), or the poll
            # ran out of time: what is not reached goes first next time.
            behind = [x.key for x in streams[position:] if x.key not in result.done]
            waiting = isinstance(exc, BucketEmpty | RateLimited)
            status = f"waiting: {exc}" if waiting else f"failing: {exc}"
            after = health.finished(record, now, status[:500], failed=not waiting, behind=behind)
            _record(rt, state.health, after)
            raise
    due = [health.retry_at(record, room) for room in result.failing]
    soonest = min((when for when in due if when is not None), default=None)
    if soonest is not None:
        result.come_back = max(0.0, (soonest - now).total_seconds())
    _record(rt, state.health, health.finished(record, now, result.status, failed=False, behind=[]))
    return result


def _record(rt: Runtime, before: Health, after: Health) -> None:
    rt.health.record(after, at_once=health.changed(before, after))
