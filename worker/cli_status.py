"""Command: ``status``: every connection's polls and budget, every subscription's events, as a
table a person reads (or ``--json``). It exits 1 when something is failing (see
:mod:`worker.status_report`), so it also serves as a healthcheck."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from storage import connections as conns
from storage import outbox
from storage import subscriptions as subs
from storage.errors import StorageUnavailable
from storage.models import ConnectionHealth
from storage.vocabulary import OutboxState
from tasks.budget import Usage
from tasks.runtime import Runtime
from worker.cli_common import print_json, runtime
from worker.cli_format import WHEN_HELP, ago, one_line, parse_when, seconds_text, stamp, table
from worker.status_report import (
    ConnectionStatus,
    Rows,
    StatusReport,
    build_report,
)

DEAD_SINCE = "1h"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="connections, polls, budgets and subscriptions at a glance; exits 1 if failing",
    )
    p.add_argument("--json", action="store_true", help="the same as JSON")
    p.add_argument(
        "--dead-since",
        metavar="WHEN",
        default=DEAD_SINCE,
        type=parse_when,
        help=f"events dead since then count as failing (default {DEAD_SINCE}); {WHEN_HELP}",
    )
    p.set_defaults(handler=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    dead_since: datetime = args.dead_since
    with runtime() as rt, rt.db.session() as s:
        rows = Rows(
            connections=conns.list_connections(s),
            health={h.connection_id: h for h in s.scalars(select(ConnectionHealth))},
            subscriptions=subs.list_subscriptions(s),
            counts=outbox.counts_by_subscription(s),
            outbox=outbox.stats(s),
            dead_recently=outbox.count_events(s, states=[OutboxState.DEAD], since=dead_since),
            usage=_usage(rt, [c.id for c in conns.list_connections(s)]),
        )
        report = build_report(rows, rt.settings, now, dead_since)
    if args.json:
        print_json(report.as_json())
    else:
        print(render(report))
    return 0 if report.healthy else 1


def _usage(rt: Runtime, connection_ids: list[int]) -> dict[int, Usage]:
    """Each connection's budget now; none when its store cannot be read (status still runs)."""
    found = {}
    for connection_id in connection_ids:
        try:
            found[connection_id] = rt.budget.usage(connection_id)
        except StorageUnavailable:
            break
    return found


def render(report: StatusReport) -> str:
    """The report as text: connections, failing rooms, subscriptions, outbox, verdict."""
    now = report.checked_at
    parts = [_connections(report.connections, now)]
    rooms = [
        [c.name, f"{r.room} ({r.room_id})" if r.room else str(r.room_id), _since(r.since, now),
         r.attempts or "-", ago(r.retry_at, now) if r.retry_at else "-", one_line(r.error, 70)]
        for c in report.connections
        for r in c.failing_rooms
    ]  # fmt: skip
    if rooms:
        heads = ["CONNECTION", "FAILING ROOM", "SINCE", "ATTEMPTS", "NEXT TRY", "ERROR"]
        parts.append(table(heads, rooms))
    subscriptions = [
        [f"{s.id} {s.name}" if s.name else s.id, s.connection, s.event, s.room or "-",
         s.target_kind, s.state + (f" ({one_line(s.state_reason, 50)})" if s.state_reason else ""),
         s.pending, s.dead]
        for s in report.subscriptions
    ]  # fmt: skip
    heads = ["SUBSCRIPTION", "CONNECTION", "EVENT", "ROOM", "TARGET", "STATE", "PENDING", "DEAD"]
    parts.append(table(heads, subscriptions) if subscriptions else "no subscriptions")
    parts.append("outbox: " + ", ".join(f"{n} {state}" for state, n in report.outbox.items()))
    if report.healthy:
        parts.append("OK: nothing failing")
    else:
        lines = "\n".join(f"  - {p}" for p in report.problems)
        parts.append(f"FAILING ({len(report.problems)}):\n{lines}")
    return "\n\n".join(parts)


def _connections(connections: list[ConnectionStatus], now: datetime) -> str:
    if not connections:
        return "no connections; add one with `hipchat-poller connection add`"
    rows = [
        [c.name, c.state, _since(c.last_ok_at, now),
         seconds_text(c.poll_lag_seconds) if c.poll_lag_seconds is not None else "-",
         ago(c.next_poll_at, now) if c.next_poll_at else "-", _calls(c), _hipchat(c, now)]
        for c in connections
    ]  # fmt: skip
    heads = ["CONNECTION", "STATE", "LAST OK POLL", "LAG", "NEXT POLL", "CALLS", "HIPCHAT"]
    return table(heads, rows)


def _since(moment: datetime | None, now: datetime) -> str:
    return f"{stamp(moment)} ({ago(moment, now)})" if moment else "never"


def _calls(c: ConnectionStatus) -> str:
    """Calls used in the current window against the ceiling (only the ceiling when the
    budget cannot tell its use)."""
    ceiling = f"{c.budget.capacity} per {c.budget.window_seconds:g}s"
    return f"max {ceiling}" if c.budget.used is None else f"{c.budget.used} of {ceiling}"


def _hipchat(c: ConnectionStatus, now: datetime) -> str:
    """HipChat's last word on the budget: calls left until its reset."""
    if c.budget.hipchat_remaining is None:
        return "-"
    reset = c.budget.hipchat_reset_at
    if reset is None or reset <= now:
        return f"{c.budget.hipchat_remaining} left (reset passed)" if reset else "-"
    return f"{c.budget.hipchat_remaining} left, reset {ago(reset, now)}"
