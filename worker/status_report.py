"""What ``hipchat-poller status`` reports, built from rows as plain data (no I/O here).

Per connection: its state, the last poll and the last successful one (``connection_health``,
written by the polls), the poll lag (now minus the last success), the next poll (from the
connection's offset in the interval, as beat schedules it), the rooms failing on their own,
and the budget: the ceiling, HipChat's last ``X-Ratelimit-Remaining`` and its reset. Per
subscription: its state and its pending and dead events.

Something is **failing**, and ``status`` exits 1, when:

* a connection is ``auth_failed``;
* an active connection has a failing room, or, having active subscriptions, has not polled
  successfully for more than :data:`LAG_INTERVALS` intervals (counted from its creation when
  it never has);
* a subscription is in ``error``;
* events went dead recently (created since ``dead_since``).

Paused connections and subscriptions are not failing: a person paused them. A connection
without a ``connection_health`` row (polls that do not write it yet) is judged by the last poll
recorded on the connection: successful when its status starts with ``ok``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage.models import Connection, ConnectionHealth, Subscription
from storage.vocabulary import ConnectionState, SubscriptionState
from tasks.budget import Usage
from tasks.settings import Settings
from worker.poll_schedule import interval_index, next_start

LAG_INTERVALS = 3
OPEN_STATES = ("pending", "dispatched")


@dataclass(frozen=True, slots=True)
class RoomFailure:
    room_id: int | str
    room: str | None
    error: str | None
    since: datetime | None
    attempts: int | None
    retry_at: datetime | None


@dataclass(frozen=True, slots=True)
class Budget:
    capacity: int
    window_seconds: float
    used: int | None  # calls in the current window; None: the budget's store was unreachable
    hipchat_remaining: int | None
    hipchat_reset_at: datetime | None


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    id: int
    name: str
    state: str
    state_reason: str | None
    created_at: datetime
    last_poll_at: datetime | None
    last_ok_at: datetime | None
    poll_lag_seconds: float | None
    next_poll_at: datetime | None
    poll_status: str | None
    failing_since: datetime | None
    failing_rooms: list[RoomFailure]
    budget: Budget
    active_subscriptions: int


@dataclass(frozen=True, slots=True)
class SubscriptionStatus:
    id: int
    name: str | None
    connection: str
    event: str
    room: str | None
    target_kind: str
    state: str
    state_reason: str | None
    pending: int
    dead: int


@dataclass(slots=True)
class StatusReport:
    checked_at: datetime
    connections: list[ConnectionStatus]
    subscriptions: list[SubscriptionStatus]
    outbox: dict[str, int]
    dead_since: datetime
    dead_recently: int
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, **asdict(self)}


@dataclass(frozen=True, slots=True)
class Rows:
    """What the report is built from, as read in one transaction."""

    connections: list[Connection]
    health: Mapping[int, ConnectionHealth]
    subscriptions: list[Subscription]
    counts: Mapping[int, Mapping[str, int]]  # subscription id -> state -> events
    outbox: dict[str, int]
    dead_recently: int
    # connection id -> its budget now (calls in the window, HipChat's last word); missing
    # when the budget's store could not be read
    usage: Mapping[int, Usage] = field(default_factory=dict)


def build_report(
    rows: Rows, settings: Settings, now: datetime, dead_since: datetime
) -> StatusReport:
    names = {c.id: c.name for c in rows.connections}
    room_names: dict[int, str | None] = {
        s.room_id: s.room_name or s.room for s in rows.subscriptions if s.room_id is not None
    }
    active: dict[int, int] = {}
    for sub in rows.subscriptions:
        if sub.state == SubscriptionState.ACTIVE:
            active[sub.connection_id] = active.get(sub.connection_id, 0) + 1
    connections = [
        _connection(
            c,
            rows.health.get(c.id),
            rows.usage.get(c.id),
            settings,
            now,
            room_names,
            active.get(c.id, 0),
        )
        for c in rows.connections
    ]
    subscriptions = [
        _subscription(s, names.get(s.connection_id, str(s.connection_id)), rows.counts.get(s.id))
        for s in rows.subscriptions
    ]
    report = StatusReport(
        now, connections, subscriptions, rows.outbox, dead_since, rows.dead_recently
    )
    report.problems = problems(report, settings.poll_interval_seconds)
    return report


def problems(report: StatusReport, interval: float) -> list[str]:
    """Every failing thing, one sentence each (see the module docstring)."""
    found = [p for c in report.connections for p in _connection_problems(c, report, interval)]
    found += [
        f"subscription {sub.id}: error ({sub.state_reason or 'no reason given'})"
        for sub in report.subscriptions
        if sub.state == SubscriptionState.ERROR
    ]
    if report.dead_recently:
        found.append(
            f"{report.dead_recently} dead event(s) since {_iso(report.dead_since)}: "
            "see `hipchat-poller events --state dead`"
        )
    return found


def _connection_problems(c: ConnectionStatus, report: StatusReport, interval: float) -> list[str]:
    if c.state == ConnectionState.AUTH_FAILED:
        return [f"connection {c.name}: auth_failed ({c.state_reason or 'no reason given'})"]
    if c.state != ConnectionState.ACTIVE:
        return []
    found = [
        f"connection {c.name}: room {room.room or room.room_id} failing"
        + (f" since {_iso(room.since)}" if room.since else "")
        + f": {room.error}"
        for room in c.failing_rooms
    ]
    last = c.last_ok_at or c.created_at
    lag = (report.checked_at - last).total_seconds()
    if c.active_subscriptions and lag > LAG_INTERVALS * interval:
        found.append(
            f"connection {c.name}: no successful poll for more than {LAG_INTERVALS} intervals "
            f"(last: {_iso(c.last_ok_at) if c.last_ok_at else 'never'})"
        )
    return found


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _connection(
    row: Connection,
    health: ConnectionHealth | None,
    usage: Usage | None,
    settings: Settings,
    now: datetime,
    room_names: Mapping[int, str | None],
    active_subscriptions: int,
) -> ConnectionStatus:
    last_ok = health.last_ok_at if health is not None else None
    interval = settings.poll_interval_seconds
    offset = row.poll_offset_seconds % interval
    due = next_start(interval_index(now.timestamp(), interval, offset), interval, offset)
    active = row.state == ConnectionState.ACTIVE
    return ConnectionStatus(
        id=row.id,
        name=row.name,
        state=row.state,
        state_reason=row.state_reason,
        created_at=row.created_at,
        last_poll_at=health.last_poll_at if health else None,
        last_ok_at=last_ok,
        poll_lag_seconds=(now - last_ok).total_seconds() if last_ok else None,
        next_poll_at=datetime.fromtimestamp(due, UTC) if active else None,
        poll_status=health.status if health else None,
        failing_since=health.failing_since if health else None,
        failing_rooms=failing_rooms(health.rooms if health else {}, room_names),
        budget=_budget(settings, usage),
        active_subscriptions=active_subscriptions,
    )


def failing_rooms(rooms: Mapping[str, Any], names: Mapping[int, str | None]) -> list[RoomFailure]:
    """The rooms failing on their own, from a health record's ``rooms``, by room id."""
    failures = []
    for key, value in sorted((rooms or {}).items()):
        entry = value if isinstance(value, dict) else {}
        room_id: int | str = int(key) if str(key).isdigit() else str(key)
        attempts = entry.get("attempts")
        failures.append(
            RoomFailure(
                room_id=room_id,
                room=names.get(room_id) if isinstance(room_id, int) else None,
                error=None if entry.get("error") is None else str(entry["error"]),
                since=moment(entry.get("since")),
                attempts=attempts if isinstance(attempts, int) else None,
                retry_at=moment(entry.get("retry_at")),
            )
        )
    return failures


def _budget(settings: Settings, usage: Usage | None) -> Budget:
    """The call budget as it stands (None where its store could not be read)."""
    reset = usage.hipchat_reset_at if usage is not None else None
    return Budget(
        capacity=settings.bucket_capacity,
        window_seconds=settings.bucket_window_seconds,
        used=usage.used if usage is not None else None,
        hipchat_remaining=usage.hipchat_remaining if usage is not None else None,
        hipchat_reset_at=datetime.fromtimestamp(reset, UTC) if reset is not None else None,
    )


def _subscription(
    row: Subscription, connection: str, counts: Mapping[str, int] | None
) -> SubscriptionStatus:
    counts = counts or {}
    return SubscriptionStatus(
        id=row.id,
        name=row.name,
        connection=connection,
        event=row.event,
        room=row.room_name or row.room,
        target_kind=row.target_kind,
        state=row.state,
        state_reason=row.state_reason,
        pending=sum(counts.get(state, 0) for state in OPEN_STATES),
        dead=counts.get("dead", 0),
    )


def moment(value: object) -> datetime | None:
    """A time written by the polls into JSON: ISO 8601 text or epoch seconds; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            found = datetime.fromisoformat(value)
        except ValueError:
            return None
        return found if found.tzinfo else found.replace(tzinfo=UTC)
    return None
