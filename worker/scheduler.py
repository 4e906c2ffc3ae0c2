"""A Celery beat scheduler that schedules one poll per active connection per interval.

It overrides only beat's hooks (``setup_schedule``, ``tick``), the way celery-redbeat does.
Each connection has a stable offset within the interval (derived from its name), so polls are
spread over the interval instead of all firing at the same second. Interval ``k`` of a
connection starts at ``k * interval + offset``; beat sends
``hipchat.poll_connection(connection_id, k)`` once per interval, and the task claims ``k`` in
Redis, so a second beat or a redelivered message cannot poll a connection twice in one
interval.

What a tick costs is proportional to what is due, not to the number of connections:

* **The schedule** is a heap by due time (:mod:`worker.poll_schedule`); a tick pops what is
  due and sleeps until the top of the heap, but at least :data:`BATCH_SECONDS`, so that the
  polls falling due meanwhile go out together.
* **Sending**: polls and the relay keep no result and send no task-sent event (one Redis
  command per task instead of four: no result channel to subscribe to and unsubscribe from,
  no event to publish), and the polls of one tick are published in pipelined batches.
* **The connection list** is read incrementally: every :data:`SYNC_EVERY_SECONDS` the rows
  whose ``updated_at`` moved (any ORM edit of a connection: pause, resume, new token), and
  every :data:`FULL_SCAN_EVERY_SECONDS` the ids of all active connections (a two-column Core
  select), which is what notices deleted rows and changes made behind the ORM's back. Poll
  health is written to ``connection_health``, not to ``connections``, so polls do not make
  every connection look changed.
* **A restart resumes the spread**: at start-up beat reads each connection's last claimed
  interval from Redis (:func:`resumed_index` says what follows). A beat that was down for
  longer than :data:`CATCH_UP_SECONDS` skips the slots it missed instead of sending every
  connection at once. Without Redis (embedded mode) there are no claims to read and every
  connection is polled at once, in its current interval.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery.beat import Scheduler

from storage.connections import active_poll_offsets, connection_changes
from storage.db import chunks
from storage.errors import StorageUnavailable
from storage.models import utcnow
from tasks import metrics
from tasks.redis_conn import redis_errors
from tasks.runtime import Runtime
from worker.poll_schedule import PollSchedule, interval_index, resumed_index

log = logging.getLogger(__name__)

POLL_TASK = "hipchat.poll_connection"
RELAY_TASK = "hipchat.relay_outbox"
PURGE_TASK = "hipchat.purge_outbox"
PURGE_EVERY_SECONDS = 3600.0

SYNC_EVERY_SECONDS = 5.0  # connections changed since the last read
FULL_SCAN_EVERY_SECONDS = 60.0  # the ids of every active connection
# Each read of changes reaches this far behind the start of the previous one: a row is
# stamped when it is flushed but seen only once its transaction commits, and the hosts'
# clocks differ a little. Re-reading a row is harmless; what this misses, the full scan sees.
CHANGE_OVERLAP = timedelta(seconds=10)
# A restarted beat sends the unclaimed slots that began this recently (what a restart missed).
CATCH_UP_SECONDS = 10.0
BATCH_SECONDS = 0.05  # the shortest sleep: each poll is sent at most this late
SEND_BATCH = 500  # messages per pipelined publish
SENDS_PER_TICK = 5000  # the rest of a start-up burst goes on the next (immediate) tick
BROKER_RETRY_SECONDS = 1.0
HEARTBEAT_EVERY = 5.0  # seconds between touches of BEAT_HEARTBEAT_FILE
CLAIM_READ_BATCH = 1000


class _NoSentEvent:
    """An event dispatcher that drops Celery's task-sent event.

    Celery has no per-task switch for task-sent events (``task_send_sent_event`` is app-wide
    and stays on for the callers of action tasks, whose sends Flower shows); ``send_task``
    passes its ``event_dispatcher`` option to ``amqp.send_task_message``, which publishes the
    event through it (celery/app/amqp.py)."""

    def publish(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_SENT_EVENT = _NoSentEvent()


@dataclass(frozen=True, slots=True)
class Message:
    name: str
    args: list[Any]
    expires: float


class ConnectionScheduler(Scheduler):  # type: ignore[misc]
    """Beat scheduler for per-connection polls plus the outbox relay.

    ``clock`` returns the wall-clock time in seconds (``time.time`` unless given). ``resume``:
    read the interval claims in Redis at start-up (default: when Redis is configured)."""

    def __init__(
        self,
        *args: Any,
        clock: Callable[[], float] = time.time,
        resume: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.clock = clock
        self._resume = resume
        self._schedule = PollSchedule(60.0)  # replaced in setup_schedule, from the settings
        # Where the next read of changes starts, on the clock rows are stamped with
        # (storage.models.utcnow), which is not the scheduler's clock in tests; None until
        # the first full scan (the one that resumes the schedule) succeeded.
        self._changes_from: datetime | None = None
        self._next_changes = -math.inf
        self._next_full_scan = -math.inf
        self._last_relay = -math.inf
        self._last_purge = -math.inf
        self._retry_sends_at = -math.inf
        self._last_heartbeat = -math.inf
        self._broker_failed = False  # the last send failed (until one succeeds)
        super().__init__(*args, **kwargs)

    @property
    def runtime(self) -> Runtime:
        return Runtime.of(self.app)

    @property
    def schedule(self) -> PollSchedule:
        return self._schedule

    def setup_schedule(self) -> None:
        settings = self.runtime.settings
        module = settings.handlers_module
        if module:
            from tasks.handlers import sync_handlers

            for change in sync_handlers(self.runtime, module):
                log.info("beat: handlers: %s", change)
        self._schedule = PollSchedule(settings.poll_interval_seconds)
        self._full_scan(self.clock())

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = self.clock()
        if now >= self._next_full_scan:
            self._full_scan(now)
        elif now >= self._next_changes and self._changes_from is not None:
            self._read_changes(now, self._changes_from)
        self._send_due(now)
        self._send_relay(now)
        self._send_purge(now)
        self._heartbeat(now)
        return self._sleep(now)

    def _heartbeat(self, now: float) -> None:
        """Touch ``BEAT_HEARTBEAT_FILE`` while beat ticks and the broker takes its sends."""
        path = self.runtime.settings.beat_heartbeat_file
        if not path or self._broker_failed or now - self._last_heartbeat < HEARTBEAT_EVERY:
            return
        self._last_heartbeat = now
        try:
            Path(path).touch()
        except OSError as exc:
            log.warning("beat: cannot touch the heartbeat file %s: %s", path, exc)

    # -- the connection list ------------------------------------------------------------------
    def _full_scan(self, now: float) -> None:
        read_at = utcnow()
        try:
            with self.runtime.db.session() as session:
                active = active_poll_offsets(session)
        except Exception:  # keep the schedule: a database blip must not stop beat
            log.exception("beat: could not read connections; keeping %d", len(self._schedule))
            self._next_full_scan = self._next_changes = now + self._sync_every()
            return
        interval = self._schedule.interval
        for gone in self._schedule.ids() - set(active):
            self._unschedule(gone)
        if self._changes_from is None:
            self._resume_schedule(now, {i: offset % interval for i, offset in active.items()})
        else:
            for conn_id, offset in active.items():
                self._schedule_connection(now, conn_id, offset)
        self._changes_from = read_at - CHANGE_OVERLAP
        self._next_full_scan = now + FULL_SCAN_EVERY_SECONDS
        self._next_changes = now + self._sync_every()

    def _read_changes(self, now: float, since: datetime) -> None:
        self._next_changes = now + self._sync_every()
        read_at = utcnow()
        try:
            with self.runtime.db.session() as session:
                rows = connection_changes(session, since)
        except Exception:  # keep the schedule: a database blip must not stop beat
            log.exception("beat: could not read changed connections")
            return
        for row in rows:
            if row.state == "active":
                self._schedule_connection(now, row.id, row.poll_offset_seconds)
            else:
                self._unschedule(row.id)
        self._changes_from = read_at - CHANGE_OVERLAP

    def _schedule_connection(self, now: float, conn_id: int, offset_seconds: float) -> None:
        """Add a new connection (polled at once, in its current interval); keep a known one."""
        interval = self._schedule.interval
        offset = offset_seconds % interval
        if self._schedule.offset(conn_id) == offset:
            return
        log.info("beat: scheduling connection %s at offset %.1fs", conn_id, offset)
        self._schedule.add(conn_id, offset, interval_index(now, interval, offset))

    def _unschedule(self, conn_id: int) -> None:
        if self._schedule.drop(conn_id):
            log.info("beat: connection %s no longer scheduled", conn_id)

    def _resume_schedule(self, now: float, offsets: dict[int, float]) -> None:
        interval = self._schedule.interval
        if not self._resumes():  # nothing to resume from: every connection now
            for conn_id, offset in offsets.items():
                self._schedule.add(conn_id, offset, interval_index(now, interval, offset))
            log.info("beat: scheduling %d connections, each at once", len(offsets))
            return
        claims = self._read_claims(list(offsets))
        now_count = 0
        for conn_id, offset in offsets.items():
            index = resumed_index(now, interval, offset, claims.get(conn_id), CATCH_UP_SECONDS)
            now_count += index == interval_index(now, interval, offset)
            self._schedule.add(conn_id, offset, index)
        log.info(
            "beat: resuming %d connections (%d with a claim): %d unclaimed slots of the last "
            "%.0fs go now, the others wait for their next slot",
            len(offsets), len(claims), now_count, CATCH_UP_SECONDS,
        )  # fmt: skip

    def _resumes(self) -> bool:
        if self._resume is not None:
            return self._resume
        return not self.runtime.settings.embedded

    def _read_claims(self, conn_ids: list[int]) -> dict[int, int]:
        """Each connection's last claimed interval (``Keys.poll_slot``), by pipelined GETs:
        the keys carry a hash tag per connection, so no MGET across Cluster slots. Redis
        unavailable: nothing is known to be claimed."""
        rt = self.runtime
        claims: dict[int, int] = {}
        try:
            with redis_errors("interval claims read", f"{len(conn_ids)} connections"):
                for part in chunks(conn_ids, CLAIM_READ_BATCH):
                    pipe = rt.redis.pipeline(transaction=False)
                    for conn_id in part:
                        pipe.get(rt.keys.poll_slot(conn_id))
                    for conn_id, value in zip(part, pipe.execute(), strict=True):
                        if value is not None:
                            claims[conn_id] = int(value)
        except StorageUnavailable as exc:
            log.warning("beat: %s; resuming as if nothing was claimed", exc)
            return {}
        return claims

    def _sync_every(self) -> float:
        return min(SYNC_EVERY_SECONDS, self._schedule.interval)

    # -- sending ------------------------------------------------------------------------------
    def _send_due(self, now: float) -> None:
        if now < self._retry_sends_at:
            return
        due = self._schedule.pop_due(now, SENDS_PER_TICK)
        if not due:
            return
        expires = self._schedule.interval
        sent = self._send([Message(POLL_TASK, [s.connection_id, s.index], expires) for s in due])
        metrics.polls_sent(sent)
        for slot in due[:sent]:
            self._schedule.sent(slot)
        for slot in due[sent:]:
            self._schedule.retry(slot)
        if sent < len(due):
            self._retry_sends_at = now + BROKER_RETRY_SECONDS

    def _send_relay(self, now: float) -> None:
        every = self.runtime.settings.relay_interval_seconds
        if now - self._last_relay >= every:
            self._last_relay = now
            self._send([Message(RELAY_TASK, [], every)])

    def _send_purge(self, now: float) -> None:
        """Every PURGE_EVERY_SECONDS: delete closed outbox events past their retention."""
        if now - self._last_purge >= PURGE_EVERY_SECONDS:
            self._last_purge = now
            self._send([Message(PURGE_TASK, [], PURGE_EVERY_SECONDS)])

    def _send(self, messages: list[Message]) -> int:
        """Publish in pipelined batches; how many went out before the broker failed (the
        rest are tried again on a later tick; a batch that failed may have gone out in part,
        and sending it again is harmless: each poll claims its interval)."""
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for part in chunks(messages, SEND_BATCH):
                    with _batch(producer):
                        for message in part:
                            self.app.send_task(
                                message.name,
                                args=message.args,
                                # What saferepr would say of ints, without its cost.
                                argsrepr=repr(message.args),
                                kwargsrepr="{}",
                                expires=message.expires,
                                producer=producer,
                                ignore_result=True,  # no result channel to subscribe to
                                event_dispatcher=_NO_SENT_EVENT,
                            )
                    sent += len(part)
        except Exception as exc:  # the broker is down: try again on a later tick
            self._broker_failed = True
            log.warning(
                "beat: could not send %d of %d tasks (%s: %s); trying again in %.0fs",
                len(messages) - sent,
                len(messages),
                type(exc).__name__,
                exc,
                BROKER_RETRY_SECONDS,
                exc_info=True,
            )
        else:
            self._broker_failed = False
            log.debug("beat: sent %d tasks", sent)
        return sent

    def _sleep(self, now: float) -> float:
        wake = min(
            now + float(self.max_interval),
            self._last_relay + self.runtime.settings.relay_interval_seconds,
            self._next_changes,
            self._next_full_scan,
        )
        due = self._schedule.next_due()
        if due is not None:
            wake = min(wake, max(due, self._retry_sends_at))
        wait = wake - now
        if wait <= 0:
            return 0.0  # more is due than one tick sends
        return min(max(wait, BATCH_SECONDS), float(self.max_interval))

    @property
    def info(self) -> str:
        return f"    . connections -> {len(self._schedule)} scheduled"


@contextmanager
def _batch(producer: Any) -> Iterator[None]:
    """kombu's pipelined publishing (``Producer.batch``, kombu 5.7+; one round trip per
    batch on Redis); immediate publishing where it is missing or unsupported."""
    batch = getattr(producer, "batch", None)
    with batch() if batch is not None else nullcontext():
        yield
