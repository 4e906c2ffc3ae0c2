"""The embedded mode's shared state: one SQLite file in the data directory.

Embedded mode has no Redis, yet several processes act for one connection: ``hipchat-poller
run``, the action commands (``post``, ``notify``, ...), the Python API. What they must agree on
(the call budget, :mod:`tasks.budget_sqlite`; what the connection posted, :mod:`tasks.posts`)
lives in ``shared-state.sqlite`` beside the database. Each operation is one ``BEGIN
IMMEDIATE`` transaction, which SQLite serialises across processes.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import StorageUnavailable

FILENAME = "shared-state.sqlite"
BUSY_TIMEOUT_SECONDS = 10.0


class SharedFile:
    """One connection per process (rebuilt after a fork), guarded by one lock per process."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir).expanduser() / FILENAME
        self._schemas: list[str] = []
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def add_schema(self, script: str) -> None:
        """Tables a user of the file needs (``CREATE TABLE IF NOT EXISTS ...``)."""
        with self._lock:
            self._schemas.append(script)
            if self._db is not None:
                self._db.executescript(script)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; SQLite's errors become :class:`StorageUnavailable`."""
        with self._lock:
            try:
                db = self._connection()
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except (sqlite3.OperationalError, OSError) as exc:  # locked too long, disk full...
                raise StorageUnavailable(f"shared state file {self.path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # forked: never share a handle
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for script in self._schemas:
                db.executescript(script)
            self._db, self._pid = db, os.getpid()
        return self._db
