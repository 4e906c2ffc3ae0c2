"""Connection health: how each connection's polls are going (``connection_health``).

Written by the polls in batches (:class:`tasks.health.HealthBook`), read by the poll itself
(which rooms back off, which streams go first) and by ``hipchat-poller status``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage.db import chunks, dialect_insert
from storage.models import Connection, ConnectionHealth


@dataclass(frozen=True, slots=True)
class Health:
    """One connection's health. ``rooms`` maps a room id (text, as JSON keys are) to
    ``{"error", "since", "attempts", "retry_at"}`` (ISO times) for each room failing on its
    own; ``behind`` lists the streams the last poll did not reach."""

    connection_id: int
    last_poll_at: datetime | None = None
    last_ok_at: datetime | None = None
    status: str | None = None
    failing_since: datetime | None = None
    rooms: dict[str, dict[str, Any]] = field(default_factory=dict)
    behind: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, row: Any, connection_id: int) -> Health:
        """From a ``ConnectionHealth`` (or any row with its columns); None: never polled."""
        if row is None:
            return cls(connection_id)
        return cls(
            connection_id=row.connection_id,
            last_poll_at=row.last_poll_at,
            last_ok_at=row.last_ok_at,
            status=row.status,
            failing_since=row.failing_since,
            rooms=dict(row.rooms or {}),
            behind=list(row.behind or []),
        )


def get_health(s: Session, connection_id: int) -> Health:
    row = s.get(ConnectionHealth, connection_id)
    return Health.of(row, connection_id)


def all_health(s: Session) -> dict[int, Health]:
    rows = s.scalars(select(ConnectionHealth))
    return {row.connection_id: Health.of(row, row.connection_id) for row in rows}


def save_health(s: Session, records: Sequence[Health]) -> None:
    """Write these records, one statement per chunk; the newest poll wins, in this batch and
    against what is stored (a batch written late never overwrites a newer poll's record from
    another process).

    A record of a connection removed meanwhile is dropped: the foreign key would refuse it."""
    latest: dict[int, Health] = {}
    for r in records:
        known = latest.get(r.connection_id)
        if known is None or _newer(r, known):
            latest[r.connection_id] = r
    if not latest:
        return
    present = set(s.scalars(select(Connection.id).where(Connection.id.in_(list(latest)))))
    rows = [
        {
            "connection_id": r.connection_id,
            "last_poll_at": r.last_poll_at,
            "last_ok_at": r.last_ok_at,
            "status": r.status,
            "failing_since": r.failing_since,
            "rooms": r.rooms,
            "behind": r.behind,
        }
        for r in latest.values()
        if r.connection_id in present
    ]
    insert = dialect_insert(s)
    for part in chunks(rows):
        statement = insert(ConnectionHealth).values(part)
        s.execute(
            statement.on_conflict_do_update(
                index_elements=["connection_id"],
                set_={c: statement.excluded[c] for c in rows[0] if c != "connection_id"},
                where=or_(
                    ConnectionHealth.last_poll_at.is_(None),
                    statement.excluded.last_poll_at.is_(None),
                    ConnectionHealth.last_poll_at <= statement.excluded.last_poll_at,
                ),
            )
        )


def newest(*records: Health | None) -> Health | None:
    """The record of the latest poll among ``records``."""
    found = [r for r in records if r is not None]
    best = found[0] if found else None
    for r in found[1:]:
        if best is None or _newer(r, best):
            best = r
    return best


def _newer(a: Health, b: Health) -> bool:
    if a.last_poll_at is None or b.last_poll_at is None:
        return a.last_poll_at is not None or b.last_poll_at is None
    return a.last_poll_at >= b.last_poll_at
