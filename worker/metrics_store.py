"""What the stores hold, read when Prometheus scrapes ``hipchat-poller metrics``.

Figures that live in the database and the budget's store are not counted by the workers: they
are read at scrape time, the way ``hipchat-poller status`` reads them:

* connections by state (every connection: one grouped query);
* per active connection, for the first ``METRICS_MAX_CONNECTIONS`` by id: its budget (calls
  used and reserved in the current window, what is left, HipChat's own last
  ``X-Ratelimit-Remaining`` while its reset is ahead: one pipelined read per connection), its
  failing rooms and the age of its last successful poll (``connection_health``);
* per subscription, its outbox events that are pending, dispatched or dead (one grouped query
  on the state index).

A scrape is bounded: the database statements run under a 5 s statement timeout (PostgreSQL),
the budgets are read until :data:`DEADLINE_SECONDS` have passed, and the connections left out
(by the bound or the deadline) are counted in ``hipchat_poller_store_connections_omitted``. A
store that cannot be read sets ``hipchat_poller_store_up{store}`` to 0; the scrape still
answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from storage import outbox
from storage.db import chunks
from storage.errors import HipChatPollerError
from storage.models import Connection, ConnectionHealth
from storage.vocabulary import ConnectionState, OutboxState
from tasks.budget import Usage
from tasks.metrics import PREFIX
from tasks.runtime import Runtime

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 5.0  # for the whole store read; the budgets stop being read after it
STATEMENT_TIMEOUT_MS = 5000
OUTBOX_STATES = (OutboxState.PENDING, OutboxState.DISPATCHED, OutboxState.DEAD)


@dataclass(frozen=True, slots=True)
class ConnectionReading:
    id: int
    failing_rooms: int
    last_ok_age_seconds: float | None  # None: never polled successfully
    usage: Usage | None = None  # None: not read (deadline, or the store is down)


@dataclass(slots=True)
class StoreReading:
    """One scrape's reading of the stores."""

    capacity: int
    by_state: dict[str, int] = field(default_factory=dict)
    connections: list[ConnectionReading] = field(default_factory=list)
    outbox: list[tuple[int, int, str, int]] = field(default_factory=list)
    omitted: int = 0
    database_up: bool = True
    budget_up: bool = True
    seconds: float = 0.0


def read_store(rt: Runtime, now: datetime, *, limit: int, deadline: float) -> StoreReading:
    """Read what the stores hold; ``deadline`` is a ``time.monotonic()`` instant."""
    started = time.monotonic()
    reading = StoreReading(capacity=rt.settings.bucket_capacity)
    try:
        with rt.db.session(readonly=True) as s:
            _statement_timeout(s)
            active = _read_connections(s, reading)
            reading.omitted = max(0, len(active) - limit)
            reading.connections = _health(s, active[:limit], now)
            reading.outbox = outbox.counts_in_states(s, OUTBOX_STATES)
    except HipChatPollerError as exc:
        log.warning("metrics: the database cannot be read: %s", exc)
        reading.database_up = False
    for i, conn in enumerate(reading.connections):
        if time.monotonic() > deadline:  # the rest keep their health figures
            unread = len(reading.connections) - i
            log.warning("metrics: the budgets of %d connection(s) not read in time", unread)
            reading.omitted += unread
            break
        try:
            usage = rt.budget.usage(conn.id)
        except HipChatPollerError as exc:
            log.warning("metrics: the budgets cannot be read: %s", exc)
            reading.budget_up = False
            break
        reading.connections[i] = ConnectionReading(
            conn.id, conn.failing_rooms, conn.last_ok_age_seconds, usage
        )
    reading.seconds = time.monotonic() - started
    return reading


def _statement_timeout(s: Session) -> None:
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))


def _read_connections(s: Session, reading: StoreReading) -> list[int]:
    """Counts connections by state into ``reading``; the active ones' ids, lowest first."""
    reading.by_state = {state.value: 0 for state in ConnectionState}
    query = select(Connection.state, func.count()).group_by(Connection.state)
    for state, count in s.execute(query):
        reading.by_state[str(state)] = int(count)
    active = select(Connection.id).where(Connection.state == ConnectionState.ACTIVE)
    return [int(i) for i in s.scalars(active.order_by(Connection.id))]


def _health(s: Session, ids: list[int], now: datetime) -> list[ConnectionReading]:
    found: dict[int, tuple[int, float | None]] = {}
    for part in chunks(ids):
        query = select(
            ConnectionHealth.connection_id, ConnectionHealth.last_ok_at, ConnectionHealth.rooms
        ).where(ConnectionHealth.connection_id.in_(part))
        for conn_id, last_ok, rooms in s.execute(query):
            age = None if last_ok is None else max(0.0, (now - _aware(last_ok)).total_seconds())
            found[int(conn_id)] = (len(rooms or {}), age)
    return [ConnectionReading(i, *found.get(i, (0, None))) for i in ids]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class StoreCollector:
    """A ``prometheus_client`` collector: one :func:`read_store` per scrape."""

    def __init__(self, rt: Runtime, *, limit: int, deadline_seconds: float = DEADLINE_SECONDS):
        self.rt = rt
        self.limit = limit
        self.deadline_seconds = deadline_seconds

    def collect(self) -> Iterator[Any]:
        now = datetime.now(UTC)
        reading = read_store(
            self.rt, now, limit=self.limit, deadline=time.monotonic() + self.deadline_seconds
        )
        yield from families(reading)


def families(reading: StoreReading) -> Iterator[Any]:
    """The metric families of one reading."""
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
        return GaugeMetricFamily(PREFIX + name, text, labels=list(labels))

    up = gauge("store_up", "1 when the store could be read at this scrape", ("store",))
    up.add_metric(["database"], float(reading.database_up))
    up.add_metric(["budget"], float(reading.budget_up))
    took = gauge("store_scrape_duration_seconds", "Time to read the stores at this scrape")
    took.add_metric([], reading.seconds)
    omitted = gauge(
        "store_connections_omitted",
        "Active connections left out of the per-connection figures (METRICS_MAX_CONNECTIONS "
        "or the scrape's deadline)",
    )
    omitted.add_metric([], float(reading.omitted))
    yield from (up, took, omitted)
    if not reading.database_up:
        return
    states = gauge("connections", "Connections by state", ("state",))
    for state, count in sorted(reading.by_state.items()):
        states.add_metric([state], float(count))
    capacity = gauge("budget_capacity_calls", "Calls a connection may make per budget window")
    capacity.add_metric([], float(reading.capacity))
    yield from (states, capacity)
    yield from _per_connection(reading)
    events = gauge(
        "outbox_events",
        "Outbox events per subscription that are pending, dispatched (handed to a worker, not "
        "delivered yet) or dead",
        ("connection", "subscription", "state"),
    )
    for conn_id, sub_id, state, count in reading.outbox:
        events.add_metric([str(conn_id), str(sub_id), state], float(count))
    yield events


def _per_connection(reading: StoreReading) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, text: str) -> Any:
        return GaugeMetricFamily(PREFIX + name, text, labels=["connection"])

    failing = gauge("connection_failing_rooms", "Rooms failing on their own, per connection")
    age = gauge(
        "connection_last_ok_poll_age_seconds",
        "Seconds since the connection's last successful poll (absent: never)",
    )
    used = gauge("budget_used_calls", "Calls the connection made in the current budget window")
    reserved = gauge("budget_reserved_calls", "Calls reserved ahead in the connection's budget")
    left = gauge("budget_remaining_calls", "Calls the connection's budget still allows now")
    hipchat = gauge(
        "hipchat_remaining_calls",
        "HipChat's last X-Ratelimit-Remaining for the connection, until its reset",
    )
    for conn in reading.connections:
        label = [str(conn.id)]
        failing.add_metric(label, float(conn.failing_rooms))
        if conn.last_ok_age_seconds is not None:
            age.add_metric(label, conn.last_ok_age_seconds)
        usage = conn.usage
        if usage is None:
            continue
        used.add_metric(label, float(usage.used))
        reserved.add_metric(label, float(usage.reserved))
        remaining = max(0, usage.capacity - usage.used - usage.reserved)
        if usage.hipchat_remaining is not None:
            hipchat.add_metric(label, float(usage.hipchat_remaining))
            remaining = min(remaining, usage.hipchat_remaining)
        left.add_metric(label, float(remaining))
    yield from (failing, age, used, reserved, left, hipchat)
