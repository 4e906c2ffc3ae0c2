"""A Celery beat scheduler that schedules one poll per active connection per interval.

It overrides only beat's hooks (``setup_schedule``, ``tick``), the way celery-redbeat does.
The connection list is re-read from the database every few seconds, so connections added,
removed or paused take effect without restarting beat. Each connection has a stable offset
within the interval (derived from its name), so polls are spread over the interval instead
of all firing at the same second.

Time is cut into numbered intervals: interval ``k`` of a connection starts at
``k * interval + offset``. Beat sends ``hipchat.poll_connection(connection_id, k)`` once per
interval; the task claims ``k`` in Redis, so a second beat or a redelivered message cannot
poll the same connection twice in one interval.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.beat import Scheduler

from storage.connections import due_connections
from tasks.runtime import Runtime

log = logging.getLogger(__name__)

SYNC_EVERY_SECONDS = 5.0
POLL_TASK = "hipchat.poll_connection"
RELAY_TASK = "hipchat.relay_outbox"
PURGE_TASK = "hipchat.purge_outbox"
PURGE_EVERY_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class PollTarget:
    connection_id: int
    offset_seconds: float


def interval_index(now: float, interval: float, offset: float) -> int:
    """Number of the interval that ``now`` falls in, for a connection with ``offset``."""
    return math.floor((now - offset) / interval)


def next_start(index: int, interval: float, offset: float) -> float:
    return (index + 1) * interval + offset


class ConnectionScheduler(Scheduler):  # type: ignore[misc]
    """Beat scheduler for per-connection polls plus the outbox relay.

    ``clock`` returns the wall-clock time in seconds (``time.time`` unless given)."""

    def __init__(self, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any) -> None:
        self.clock = clock
        self._targets: dict[int, PollTarget] = {}
        self._sent: dict[int, int] = {}
        # Not "_last_sync": celery's Scheduler uses that name (monotonic time) for its own
        # schedule syncing, and this one holds wall-clock time.
        self._last_connection_sync = -math.inf
        self._last_relay = -math.inf
        self._last_purge = -math.inf
        super().__init__(*args, **kwargs)

    @property
    def runtime(self) -> Runtime:
        return Runtime.of(self.app)

    def setup_schedule(self) -> None:
        module = self.runtime.settings.handlers_module
        if module:
            from tasks.handlers import sync_handlers

            for change in sync_handlers(self.runtime, module):
                log.info("beat: handlers: %s", change)
        self._sync_connections(self.clock())

    def _sync_connections(self, now: float) -> None:
        interval = self.runtime.settings.poll_interval_seconds
        try:
            with self.runtime.db.session() as session:
                rows = due_connections(session)
        except Exception:  # keep the previous list: a database blip must not stop beat
            log.exception("beat: could not read connections; keeping %d", len(self._targets))
            return
        targets = {row.id: PollTarget(row.id, row.poll_offset_seconds % interval) for row in rows}
        for gone in set(self._targets) - set(targets):
            log.info("beat: connection %s no longer scheduled", gone)
            self._sent.pop(gone, None)
        for new in set(targets) - set(self._targets):
            log.info(
                "beat: scheduling connection %s at offset %.1fs", new, targets[new].offset_seconds
            )
            # Start with the current interval: a new connection is polled right away.
            self._sent[new] = interval_index(now, interval, targets[new].offset_seconds) - 1
        self._targets = targets
        self._last_connection_sync = now

    def tick(self, *args: Any, **kwargs: Any) -> float:
        now = self.clock()
        settings = self.runtime.settings
        interval = settings.poll_interval_seconds
        if now - self._last_connection_sync >= min(SYNC_EVERY_SECONDS, interval):
            self._sync_connections(now)
        wake: float = now + float(self.max_interval)
        for target in self._targets.values():
            index = interval_index(now, interval, target.offset_seconds)
            if index > self._sent.get(target.connection_id, index - 1):
                self._send_poll(target.connection_id, index, interval)
            wake = min(wake, next_start(index, interval, target.offset_seconds))
        if now - self._last_relay >= settings.relay_interval_seconds:
            self._last_relay = now
            self._send(RELAY_TASK, [], expires=settings.relay_interval_seconds)
        wake = min(wake, self._last_relay + settings.relay_interval_seconds)
        self._send_purge(now)
        return max(0.0, min(wake - now, float(self.max_interval)))

    def _send_purge(self, now: float) -> None:
        """Every PURGE_EVERY_SECONDS: delete closed outbox events past their retention."""
        if now - self._last_purge >= PURGE_EVERY_SECONDS:
            self._last_purge = now
            self._send(PURGE_TASK, [], expires=PURGE_EVERY_SECONDS)

    def _send_poll(self, connection_id: int, index: int, interval: float) -> None:
        if self._send(POLL_TASK, [connection_id, index], expires=interval):
            self._sent[connection_id] = index

    def _send(self, name: str, args: list[Any], *, expires: float) -> bool:
        try:
            self.app.send_task(name, args=args, expires=expires)
        except Exception:  # the broker is down: try again on the next tick
            log.exception("beat: could not send %s%s", name, args)
            return False
        log.debug("beat: sent %s%s", name, args)
        return True

    @property
    def info(self) -> str:
        return f"    . connections -> {len(self._targets)} scheduled"
