"""Adding and removing connections: the database row and the connection's budget together.

The command line, recipes, the demo and the Python API add connections here, never straight
through :mod:`storage.connections`: a new connection's budget must be started
(:meth:`tasks.budget.SlidingLogBudget.initialise`), or its first calls would wait a whole
window, as after a lost budget log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage import connections as conns
from storage.errors import StorageUnavailable
from tasks.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AddedConnection:
    id: int
    name: str
    base_url: str


def add_connection(rt: Runtime, name: str, base_url: str, token: str) -> AddedConnection:
    """Store a connection (token encrypted) and start its budget."""
    with rt.db.session() as s:
        row = conns.add_connection(
            s,
            name,
            base_url,
            token,
            rt.cipher,
            poll_interval_seconds=rt.settings.poll_interval_seconds,
        )
        added = AddedConnection(row.id, row.name, row.base_url)
    start_budgets(rt, [added.id])
    return added


def start_budgets(rt: Runtime, connection_ids: list[int]) -> None:
    """Start the budgets of connections just added. Without the budget's store (Redis down)
    the connection still works: its first calls wait one budget window."""
    for connection_id in connection_ids:
        try:
            rt.budget.initialise(connection_id)
        except StorageUnavailable as exc:
            log.warning(
                "connection %s: budget not started (%s); its first calls wait one window",
                connection_id,
                exc,
            )


def remove_connection(rt: Runtime, name_or_id: str | int) -> bool:
    """Remove a connection with its subscriptions, watermarks, events and budget."""
    with rt.db.session() as s:
        row = conns.get_connection(s, name_or_id)
        if row is None:
            return False
        connection_id = row.id
        conns.remove_connection(s, connection_id)
    try:
        rt.budget.clear(connection_id)
    except StorageUnavailable as exc:
        log.warning("connection %s: budget not cleared (%s)", connection_id, exc)
    return True
