"""``hipchat-poller status``: per connection its polls, lag, next poll, failing rooms and
budget; per subscription its pending and dead events; exit 1 when something is failing.
``connection_health`` is written by the polls; here the tests fill it directly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from emulator import EmulatorServer
from storage import outbox
from storage import subscriptions as subs
from storage.models import Connection, ConnectionHealth, Subscription
from storage.outbox import NewEvent
from tasks.budget import Usage
from tasks.settings import Settings
from tests.cli_support import Cli, runtime
from worker.status_report import LAG_INTERVALS, Rows, build_report

NOW = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
SETTINGS = Settings(poll_interval_seconds=60.0)


def connection(state: str = "active", *, offset: float = 10.0, age: float = 3600) -> Connection:
    return Connection(
        id=1, name="ops", state=state, state_reason=None if state == "active" else "HTTP 401",
        poll_offset_seconds=offset, created_at=NOW - timedelta(seconds=age),
    )  # fmt: skip


def health(**values: Any) -> ConnectionHealth:
    values = {"rooms": {}, "last_poll_at": None, "last_ok_at": None} | values
    return ConnectionHealth(connection_id=1, status=None, failing_since=None, **values)


def subscription(state: str = "active") -> Subscription:
    return Subscription(
        id=7, connection_id=1, event="room_message", room="Dev", room_id=10003, room_name="Dev",
        target_kind="log", target={}, state=state, state_reason=None, name="dev",
    )  # fmt: skip


def report_of(
    conn: Connection,
    found: ConnectionHealth | None = None,
    dead: int = 0,
    subscriptions: tuple[Subscription, ...] = (subscription(),),
    usage: Usage | None = None,
) -> Any:
    rows = Rows(
        [conn],
        {1: found} if found else {},
        list(subscriptions),
        {},
        {"dead": dead},
        dead,
        {1: usage} if usage else {},
    )
    return build_report(rows, SETTINGS, NOW, NOW - timedelta(hours=1))


def test_a_connection_polled_a_moment_ago_is_healthy() -> None:
    report = report_of(connection(), health(last_ok_at=NOW - timedelta(seconds=12)))
    [c] = report.connections
    assert c.poll_lag_seconds == 12.0
    # offset 10 s into each minute: now is 12:00:30, so the next poll is at 12:01:10.
    assert c.next_poll_at == datetime(2030, 1, 1, 12, 1, 10, tzinfo=UTC)
    assert (report.healthy, report.problems) == (True, [])


@pytest.mark.parametrize(
    ("last_ok", "age", "failing"),
    [
        (timedelta(seconds=LAG_INTERVALS * 60 - 1), 3600, False),
        (timedelta(seconds=LAG_INTERVALS * 60 + 1), 3600, True),
        (None, 60, False),  # new: it has not had its chance yet
        (None, 3600, True),  # never polled successfully in an hour
    ],
)
def test_a_poll_lag_over_three_intervals_is_failing(
    last_ok: timedelta | None, age: float, failing: bool
) -> None:
    found = health(last_ok_at=NOW - last_ok if last_ok else None)
    report = report_of(connection(age=age), found)
    assert report.healthy is not failing
    if failing:
        assert report.problems[0].startswith("connection ops: no successful poll for more than 3")


def test_a_connection_without_active_subscriptions_does_not_poll_so_it_cannot_lag() -> None:
    assert report_of(connection(), subscriptions=()).healthy
    assert report_of(connection(), subscriptions=(subscription("paused"),)).healthy


def test_a_connection_never_polled_has_no_last_poll() -> None:
    report = report_of(connection())
    assert (report.connections[0].last_poll_at, report.connections[0].last_ok_at) == (None, None)


def test_a_paused_connection_is_not_failing_and_has_no_next_poll() -> None:
    report = report_of(connection("paused"), health(last_ok_at=NOW - timedelta(days=3)))
    assert report.healthy
    assert report.connections[0].next_poll_at is None


def test_an_auth_failed_connection_is_failing() -> None:
    report = report_of(connection("auth_failed"))
    assert report.problems == ["connection ops: auth_failed (HTTP 401)"]


def test_failing_rooms_are_read_from_the_health_row_and_the_budget_from_the_budget() -> None:
    since = NOW - timedelta(minutes=3)
    found = health(
        last_ok_at=NOW,
        rooms={"10003": {"error": "NotFound: HTTP 404", "since": since.isoformat(),
                         "attempts": 4, "retry_at": (NOW + timedelta(seconds=40)).timestamp()}},
    )  # fmt: skip
    reset = (NOW + timedelta(seconds=130)).timestamp()
    usage = Usage(used=7, reserved=2, capacity=100, hipchat_remaining=87, hipchat_reset_at=reset)
    report = report_of(connection(), found, usage=usage)
    [room] = report.connections[0].failing_rooms
    assert (room.room_id, room.error, room.since, room.attempts) == (
        10003,
        "NotFound: HTTP 404",
        since,
        4,
    )
    assert room.retry_at == NOW + timedelta(seconds=40)
    budget = report.connections[0].budget
    assert (budget.capacity, budget.window_seconds, budget.used) == (100, 60.0, 7)
    assert (budget.hipchat_remaining, budget.hipchat_reset_at) == (87, NOW + timedelta(seconds=130))
    assert report.problems == [
        "connection ops: room Dev failing since 2030-01-01 11:57:30 UTC: NotFound: HTTP 404"
    ]


def test_recent_dead_events_are_failing() -> None:
    assert report_of(connection(), health(last_ok_at=NOW), dead=2).problems == [
        "2 dead event(s) since 2030-01-01 11:00:30 UTC: see `hipchat-poller events --state dead`"
    ]


# -- the command ----------------------------------------------------------------------------


def write_health(**values: Any) -> None:
    with runtime().db.session() as s:
        s.merge(health(**values))


def test_status_as_a_table_and_healthy(cli: Cli, ops: EmulatorServer) -> None:
    assert cli("subscribe", "ops", "--event", "room_created", "--log", "--name", "rooms")[0] == 0
    now = datetime.now(UTC)
    write_health(last_poll_at=now, last_ok_at=now - timedelta(seconds=5))

    code, out, _ = cli("status")

    assert code == 0
    blocks = out.rstrip("\n").split("\n\n")
    connections = blocks[0].splitlines()
    assert connections[0].split() == [
        "CONNECTION", "STATE", "LAST", "OK", "POLL", "LAG", "NEXT", "POLL", "CALLS", "HIPCHAT",
    ]  # fmt: skip
    row = connections[1].split()
    assert row[:2] == ["ops", "active"]
    assert row[4:8] == ["(5s", "ago)", "5s", "in"]
    # The token check of `connection add` made one call; HipChat said how many it has left.
    assert " ".join(row[9:]).startswith("1 of 100 per 60s 99 left, reset in ")
    assert blocks[1].splitlines()[1].split() == [
        "1", "rooms", "ops", "room_created", "-", "log", "active", "0", "0",
    ]  # fmt: skip
    assert blocks[2] == "outbox: 0 pending, 0 dispatched, 0 delivered, 0 dead"
    assert blocks[3] == "OK: nothing failing"


def test_status_exits_1_and_says_what_is_failing(cli: Cli, ops: EmulatorServer) -> None:
    code, _, err = cli("subscribe", "ops", "--event", "room_message", "--room", "Factor", "--log")
    assert code == 0, err
    now = datetime.now(UTC)
    write_health(last_ok_at=now, rooms={"10003": {"error": "NotFound: HTTP 404"}})
    with runtime().db.session() as s:
        subs.set_subscription_state(s, 1, "error", "webhook answered 410")
        [event] = outbox.add_events(s, [NewEvent(1, 1, "k", "room_message", {})])
        outbox.mark_failed(s, event.id, "gone", None, dead=True)

    code, out, _ = cli("status")

    assert code == 1
    blocks = [block.splitlines() for block in out.rstrip().split("\n\n")]
    assert blocks[1][1].split() == [
        "ops",
        "Factor",
        "(10003)",
        "never",
        "-",
        "-",
        "NotFound:",
        "HTTP",
        "404",
    ]
    assert blocks[2][1].split()[:6] == ["1", "ops", "room_message", "Factor", "log", "error"]
    verdict = blocks[-1]
    assert verdict[:3] == [
        "FAILING (3):",
        "  - connection ops: room Factor failing: NotFound: HTTP 404",
        "  - subscription 1: error (webhook answered 410)",
    ]
    assert verdict[3].startswith("  - 1 dead event(s) since ")
    later = (now + timedelta(minutes=1)).isoformat()
    code, out, _ = cli("status", "--json", "--dead-since", later)
    assert code == 1
    assert [p.split(":")[0] for p in json.loads(out)["problems"]] == [
        "connection ops",
        "subscription 1",
    ]


def test_status_of_nothing(cli: Cli) -> None:
    code, out, _ = cli("status")
    assert code == 0
    assert out.splitlines()[0] == "no connections; add one with `hipchat-poller connection add`"


def test_status_json_lists_every_field(cli: Cli, ops: EmulatorServer) -> None:
    report = cli.json("status", "--json")
    assert set(report) == {
        "healthy", "checked_at", "connections", "subscriptions", "outbox", "dead_since",
        "dead_recently", "problems",
    }  # fmt: skip
    [c] = report["connections"]
    assert set(c) >= {"last_ok_at", "poll_lag_seconds", "next_poll_at", "failing_rooms", "budget"}
    assert {k: v for k, v in c["budget"].items() if k != "hipchat_reset_at"} == {
        "capacity": 100, "window_seconds": 60.0, "used": 1, "hipchat_remaining": 99,
    }  # fmt: skip
