"""What a poll learns about its connection's health, and the per-process writer of it.

* Pure rules (:func:`room_failed`, :func:`room_ok`, :func:`backing_off`, :func:`finished`):
  a room that fails on its own (5xx, a timeout, a malformed answer) is retried on its own,
  after a growing wait, while every other room of the connection is read each interval; its
  error and since when are kept for ``status``; a connection whose polls fail is failing,
  never ``ok``.
* :class:`HealthBook`: polls record their outcome here; a thread of each process writes the
  newest record of each connection every :data:`FLUSH_SECONDS` in one transaction. A quiet poll
  therefore writes nothing itself: its bookkeeping is a share of one small batch. What the
  next poll must see (a room failing or recovering, streams left behind) is written at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from storage.db import Database
from storage.errors import HipChatPollerError
from storage.health import Health, save_health

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0
ROOM_BACKOFF_FIRST_SECONDS = 5.0
ROOM_BACKOFF_MAX_SECONDS = 900.0
MAX_ERROR_CHARS = 300


def room_backoff(attempts: int) -> float:
    """Seconds before a room that failed ``attempts`` times in a row is read again."""
    return float(
        min(ROOM_BACKOFF_MAX_SECONDS, ROOM_BACKOFF_FIRST_SECONDS * 2 ** max(0, attempts - 1))
    )


def room_failed(health: Health, room_id: int, error: HipChatPollerError, now: datetime) -> Health:
    """The room failed on its own: count it, keep since when, and when to try it again."""
    key = str(room_id)
    before = health.rooms.get(key, {})
    attempts = int(before.get("attempts", 0)) + 1
    entry = {
        "error": f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS],
        "since": before.get("since", now.isoformat()),
        "attempts": attempts,
        "retry_at": (now + timedelta(seconds=room_backoff(attempts))).isoformat(),
    }
    return replace(health, rooms={**health.rooms, key: entry})


def room_ok(health: Health, room_id: int) -> Health:
    if str(room_id) not in health.rooms:
        return health
    return replace(health, rooms={k: v for k, v in health.rooms.items() if k != str(room_id)})


def retry_at(health: Health, room_id: int) -> datetime | None:
    entry = health.rooms.get(str(room_id))
    return datetime.fromisoformat(entry["retry_at"]) if entry else None


def backing_off(health: Health, room_id: int, now: datetime) -> bool:
    """True while a failing room waits for its next try."""
    when = retry_at(health, room_id)
    return when is not None and when > now


def forget_rooms(health: Health, keep: Iterable[int]) -> Health:
    """Drop failing rooms no subscription watches any more."""
    wanted = {str(r) for r in keep}
    if all(k in wanted for k in health.rooms):
        return health
    return replace(health, rooms={k: v for k, v in health.rooms.items() if k in wanted})


def changed(before: Health, after: Health) -> bool:
    """True when ``after`` says more than when and how the last poll went: rooms that fail
    or recover, streams left behind, a connection that starts or stops failing."""
    return (
        before.rooms != after.rooms
        or before.behind != after.behind
        or (before.failing_since is None) != (after.failing_since is None)
    )


def finished(
    health: Health,
    now: datetime,
    status: str,
    *,
    failed: bool,
    behind: list[str],
) -> Health:
    """The poll is over: ``failed`` when it failed as a whole or a room is failing."""
    failing = failed or bool(health.rooms)
    return replace(
        health,
        last_poll_at=now,
        last_ok_at=health.last_ok_at if failing else now,
        status=status,
        failing_since=(health.failing_since or now) if failing else None,
        behind=behind,
    )


class HealthBook:
    """The health records of this process's polls, written in batches by one thread.

    ``record`` never touches the database. ``flush`` writes what is pending (the thread calls
    it every :data:`FLUSH_SECONDS`; tests and shutdown call it directly). A failed write keeps
    the records for the next flush, unless a newer record of the same connection replaced
    them meanwhile.
    """

    def __init__(self, db: Database, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._db = db
        self._flush_seconds = flush_seconds
        self._pending: dict[int, Health] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._stop = threading.Event()

    def record(self, health: Health, *, at_once: bool = False) -> None:
        """Keep ``health`` for the next batch; ``at_once`` writes it now, with whatever else is
        pending (for what the connection's next poll, maybe in another process, must see)."""
        with self._lock:
            self._pending[health.connection_id] = health
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="hipchat-health", daemon=True
                )
                self._thread.start()
        if at_once:
            self.flush()

    def latest(self, connection_id: int) -> Health | None:
        """A record not written yet, if any (newer than what the database holds)."""
        with self._lock:
            return self._pending.get(connection_id)

    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        try:
            with self._db.session() as s:
                save_health(s, list(batch.values()))
        except HipChatPollerError as exc:
            log.warning("health of %d connection(s) not written yet: %s", len(batch), exc)
            with self._lock:
                self._pending = batch | self._pending
            return 0
        return len(batch)

    def stop(self) -> None:
        self._stop.set()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_seconds):
            self.flush()
