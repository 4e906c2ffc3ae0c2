"""The budget's log and state in the embedded mode's shared file (:mod:`tasks.shared_file`).

Embedded mode has no Redis, yet several processes call HipChat with one connection's token:
``hipchat-poller run``, the action commands (``post``, ``notify``, ...), the Python API. They
share the data directory, so they share its state file, and with it the budget.

Each take is one ``BEGIN IMMEDIATE`` transaction, which SQLite serialises across processes,
and follows ``budget_take.lua`` rule for rule (the same behaviour tests run against both).
Time is this machine's clock: every process sharing the file runs on this machine. Stamps
strictly increase along a connection's log, so a clock stepping back frees nothing early.
"""

from __future__ import annotations

import sqlite3
import time

from tasks.budget import Limits, Take
from tasks.shared_file import SharedFile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_log (
    connection_id INTEGER NOT NULL,
    stamp INTEGER NOT NULL,
    PRIMARY KEY (connection_id, stamp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_state (
    connection_id INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    remaining INTEGER,
    reset INTEGER NOT NULL DEFAULT 0
);
-- The latest reset a 429 stated: no headers lift its zero before then (budget_ceiling.lua).
CREATE TABLE IF NOT EXISTS budget_refusals (
    connection_id INTEGER PRIMARY KEY,
    until INTEGER NOT NULL
);
"""


def _now_us() -> int:
    return time.time_ns() // 1000


class SqliteLog:
    def __init__(self, shared: SharedFile) -> None:
        self._shared = shared
        shared.add_schema(_SCHEMA)

    def prepare(self, limits: Limits) -> Take:
        def take(connection_id: int, n: int, mode: str, held: str) -> tuple[int, int, int, int]:
            with self._shared.transaction() as db:
                return _take(db, connection_id, limits, n, mode, held, _now_us())

        return take

    def set_ceiling(self, connection_id: int, remaining: int, reset_us: int, why: str) -> None:
        with self._shared.transaction() as db:
            now = _now_us()
            if reset_us <= now:
                return
            if why == "429":
                db.execute(
                    "INSERT INTO budget_refusals (connection_id, until) VALUES (?, ?) "
                    "ON CONFLICT (connection_id) DO UPDATE SET until = max(until, excluded.until)",
                    (connection_id, reset_us),
                )
            elif _refused_until(db, connection_id) > now:
                return
            row = db.execute(
                "SELECT remaining, reset FROM budget_state WHERE connection_id = ?",
                (connection_id,),
            ).fetchone()
            if row is not None and row[0] is not None and row[1] > now:
                current, current_reset = row
                if why == "429":
                    if current <= 0 and current_reset >= reset_us:
                        return
                elif reset_us < current_reset or (
                    reset_us == current_reset and remaining >= current
                ):
                    return
            if row is None:
                # Epoch 0 is "unknown": the next take treats the log as lost, as on Redis.
                db.execute(
                    "INSERT INTO budget_state (connection_id, epoch, remaining, reset) "
                    "VALUES (?, 0, ?, ?)",
                    (connection_id, remaining, reset_us),
                )
            else:
                db.execute(
                    "UPDATE budget_state SET remaining = ?, reset = ? WHERE connection_id = ?",
                    (remaining, reset_us, connection_id),
                )

    def initialise(self, connection_id: int) -> None:
        with self._shared.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO budget_state (connection_id, epoch) VALUES (?, ?)",
                (connection_id, _now_us()),
            )

    def clear(self, connection_id: int) -> None:
        with self._shared.transaction() as db:
            db.execute("DELETE FROM budget_log WHERE connection_id = ?", (connection_id,))
            db.execute("DELETE FROM budget_state WHERE connection_id = ?", (connection_id,))
            db.execute("DELETE FROM budget_refusals WHERE connection_id = ?", (connection_id,))

    def recent(self, connection_id: int) -> tuple[list[int], int, int, int]:
        with self._shared.transaction() as db:
            stamps = [
                row[0]
                for row in db.execute(
                    "SELECT stamp FROM budget_log WHERE connection_id = ? ORDER BY stamp DESC",
                    (connection_id,),
                )
            ]
            row = db.execute(
                "SELECT remaining, reset FROM budget_state WHERE connection_id = ?",
                (connection_id,),
            ).fetchone()
        remaining = row[0] if row is not None and row[0] is not None else -1
        return stamps, remaining, row[1] if row is not None else 0, _now_us()


def _take(
    db: sqlite3.Connection,
    conn: int,
    limits: Limits,
    n: int,
    mode: str,
    held: str,
    now: int,
) -> tuple[int, int, int, int]:
    """``budget_take.lua``, rule for rule (see there for the why)."""
    row = db.execute(
        "SELECT epoch, remaining, reset FROM budget_state WHERE connection_id = ?", (conn,)
    ).fetchone()
    if row is None or row[0] == 0:
        if mode == "peek":
            return 0, limits.window, 0, 0
        db.execute("DELETE FROM budget_log WHERE connection_id = ?", (conn,))
        db.execute(
            "INSERT OR REPLACE INTO budget_state (connection_id, epoch, remaining, reset) "
            "VALUES (?, ?, 0, ?)",
            (conn, now, now + limits.window),
        )
        row = (now, 0, now + limits.window)
    epoch, stored_remaining, reset = row
    capped = stored_remaining is not None and reset > now
    remaining = stored_remaining if capped else 0

    if held and mode == "reserve":
        held_epoch, held_stamp, *counted = held.split(":")
        stamp, reserved = int(held_stamp), int(counted[0]) if counted else 1
        if held_epoch == str(epoch):
            if n <= reserved and now < stamp:  # early: the same reservation
                return 2, stamp - now, stamp, epoch
            if n <= reserved and now <= stamp + limits.tolerance:  # due
                if capped and remaining < n:
                    return 0, reset - now, 0, 0
                if capped:
                    _spend(db, conn, n)
                return 1, 0, stamp, 0
            # late, or wanting more than it reserved: its slot goes unused; its stamps stood
            # for no call
            db.executemany(
                "DELETE FROM budget_log WHERE connection_id = ? AND stamp = ?",
                [(conn, stamp + i) for i in range(reserved)],
            )

    earliest = now
    bound = _nth_newest(db, conn, limits.capacity - n)
    if bound is not None and bound + limits.window > earliest:
        earliest = bound + limits.window
    if capped and remaining < n and reset > earliest:
        earliest = reset
    forbidden = earliest > now
    newest = _nth_newest(db, conn, 0)
    if newest is not None and newest + 1 > earliest:
        earliest = newest + 1
    waits = forbidden or earliest - now > limits.grace

    if waits and (mode != "reserve" or earliest - now > limits.horizon):
        return 0, earliest - now, 0, 0
    if mode == "peek":
        return 1, 0, 0, 0

    db.executemany(
        "INSERT INTO budget_log (connection_id, stamp) VALUES (?, ?)",
        [(conn, earliest + i) for i in range(n)],
    )
    oldest_kept = _nth_newest(db, conn, 2 * limits.capacity - 1)
    if oldest_kept is not None and _nth_newest(db, conn, 3 * limits.capacity) is not None:
        db.execute(
            "DELETE FROM budget_log WHERE connection_id = ? AND stamp < ?", (conn, oldest_kept)
        )
    if capped and earliest < reset:
        _spend(db, conn, n)
    if waits:
        return 2, earliest - now, earliest, epoch
    return 1, 0, earliest, 0


def _refused_until(db: sqlite3.Connection, conn: int) -> int:
    row = db.execute(
        "SELECT until FROM budget_refusals WHERE connection_id = ?", (conn,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _nth_newest(db: sqlite3.Connection, conn: int, n: int) -> int | None:
    row = db.execute(
        "SELECT stamp FROM budget_log WHERE connection_id = ? ORDER BY stamp DESC LIMIT 1 OFFSET ?",
        (conn, n),
    ).fetchone()
    return None if row is None else int(row[0])


def _spend(db: sqlite3.Connection, conn: int, n: int) -> None:
    db.execute(
        "UPDATE budget_state SET remaining = remaining - ? WHERE connection_id = ?", (n, conn)
    )
