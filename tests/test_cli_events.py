"""``hipchat-poller events``: the history of events, one event's attempts, and replay under
the same idempotency keys. Events are written straight into the outbox (no poll needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emulator import EmulatorServer
from storage import outbox
from storage import subscriptions as subs
from storage.models import OutboxEvent
from storage.outbox import NewEvent
from tests.cli_support import ENV_PREFIX, Cli, runtime
from tests.redis_server import RedisServer

NOW = datetime.now(UTC)
ERROR = "ServerError: webhook https://ci.example/hook answered 503"


@pytest.fixture
def history(cli: Cli, ops: EmulatorServer) -> dict[str, int]:
    """Subscriptions 1 (ping-pong, log) and 2 (ci, webhook); events: one delivered, one
    pending, one dead after three failed attempts, one dead long ago."""
    for argv in (
        ["--event", "room_message", "--room", "Factor", "--log", "--name", "ping-pong"],
        ["--event", "room_file_upload", "--room", "Factor", "--webhook", "https://ci.example/hook"],
    ):
        code, _, err = cli("subscribe", "ops", *argv)
        assert code == 0, err
    with runtime().db.session() as s:
        made = outbox.add_events(
            s,
            [
                NewEvent(1, 1, "sub:1:a", "room_message", {"message": "ping a"}),
                NewEvent(1, 1, "sub:1:b", "room_message", {"message": "ping b"}),
                NewEvent(1, 2, "sub:2:f", "room_file_upload", {"file": "report.pdf"}),
                NewEvent(1, 2, "sub:2:old", "room_file_upload", {"file": "old.pdf"}),
            ],
            at=NOW - timedelta(minutes=10),
        )
        delivered, pending, dead, old = (e.id for e in made)
        outbox.mark_delivered(s, delivered, NOW - timedelta(minutes=9), "logged", duration_ms=2)
        for i in range(3):
            at = NOW - timedelta(minutes=8 - i)
            outbox.mark_failed(s, dead, ERROR, None, dead=i == 2, at=at, duration_ms=100 + i)
        outbox.mark_failed(s, old, "gone", None, dead=True)
        s.get_one(OutboxEvent, old).created_at = NOW - timedelta(days=2)
    return {"delivered": delivered, "pending": pending, "dead": dead, "old": old}


def test_events_lists_the_newest_first_as_a_table(cli: Cli, history: dict[str, int]) -> None:
    code, out, _ = cli("events")

    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "ID", "CONNECTION", "SUBSCRIPTION", "EVENT", "STATE", "FAILED", "CREATED", "DELIVERED",
        "LAST", "ERROR",
    ]  # fmt: skip
    assert [row.split()[0] for row in rows] == ["4", "3", "2", "1"]
    dead = rows[1].split()
    assert dead[:7] == ["3", "ops", "2", "room_file_upload", "dead", "3", NOW.strftime("%Y-%m-%d")]
    assert rows[1].endswith(ERROR)
    assert rows[3].split()[:6] == ["1", "ops", "1", "ping-pong", "room_message", "delivered"]


def test_events_filters(cli: Cli, history: dict[str, int]) -> None:
    def ids(*argv: str) -> list[int]:
        return [e["id"] for e in cli.json("events", *argv, "--json")]

    assert ids("ops") == [4, 3, 2, 1]
    assert ids("--subscription", "1") == [2, 1]
    assert ids("--state", "dead") == [4, 3]
    assert ids("--state", "dead", "--state", "pending") == [4, 3, 2]
    assert ids("--since", "1h") == [3, 2, 1]
    assert ids("--since", (NOW - timedelta(hours=1)).isoformat()) == [3, 2, 1]
    assert ids("--limit", "2") == [4, 3]
    assert cli("events", "--state", "lost")[0] == 2
    assert cli("events", "--since", "yesterday")[0] == 2
    assert cli("events", "nope") == (2, "", "error: no connection named 'nope'\n")


def test_events_json_has_subscription_names_and_times(cli: Cli, history: dict[str, int]) -> None:
    [event] = cli.json("events", "--subscription", "1", "--state", "delivered", "--json")
    assert event["connection"] == {"id": 1, "name": "ops"}
    assert event["subscription"] == {"id": 1, "name": "ping-pong"}
    assert (event["state"], event["attempts"], event["outcome"]) == ("delivered", 0, "logged")
    assert event["idempotency_key"] == "sub:1:a"
    assert datetime.fromisoformat(event["delivered_at"]) == NOW - timedelta(minutes=9)


def test_events_show_has_the_payload_and_every_attempt(cli: Cli, history: dict[str, int]) -> None:
    code, out, _ = cli("events", "show", str(history["dead"]))

    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == [
        "event 3: room_file_upload for subscription 2 (no name) of connection ops",
        "state: dead; failed attempts: 3",
        "idempotency key: sub:2:f",
        f"created {(NOW - timedelta(minutes=10)):%Y-%m-%d %H:%M:%S}, delivered -",
    ]
    attempts = lines[lines.index("attempts:") + 2 : lines.index("payload:")]
    assert [a.split(None, 4)[2:] for a in attempts] == [
        [f"{100 + i}", "ms", f"error: {ERROR}"] for i in range(3)
    ]
    assert json.loads("\n".join(lines[lines.index("payload:") + 1 :])) == {"file": "report.pdf"}

    shown = cli.json("events", "show", str(history["delivered"]), "--json")
    assert shown["payload"] == {"message": "ping a"}
    assert [(a["outcome"], a["ms"]) for a in shown["attempt_log"]] == [("logged", 2)]
    assert cli("events", "show", "99") == (2, "", "error: no event 99\n")
    assert cli("events", "show")[0] == 2


def test_replay_one_event_by_id(cli: Cli, history: dict[str, int]) -> None:
    code, out, _ = cli("events", "replay", str(history["dead"]))

    assert code == 0
    assert out.splitlines() == [
        "re-queued 1 event(s) under their idempotency keys: 3",
        "the relay hands them to a worker within 10 s (RELAY_INTERVAL_SECONDS) while beat "
        "(or `hipchat-poller run`) is running",
    ]
    [event] = cli.json("events", "--subscription", "2", "--state", "pending", "--json")
    assert (event["id"], event["idempotency_key"], event["attempts"]) == (3, "sub:2:f", 0)
    shown = cli.json("events", "show", "3", "--json")
    assert len(shown["attempt_log"]) == 4  # three attempts kept, and the replay
    assert shown["attempt_log"][-1]["replayed"] is True


def test_replay_by_subscription_dead_and_since(cli: Cli, history: dict[str, int]) -> None:
    assert cli("events", "replay", "--dead", "--since", "1h")[1].startswith(
        "re-queued 1 event(s) under their idempotency keys: 3\n"
    )
    assert cli("events", "replay", "--subscription", "2")[1].startswith(
        "re-queued 1 event(s) under their idempotency keys: 4\n"
    )
    assert cli("events", "replay", "--dead") == (0, "nothing to replay\n", "")
    assert [e["state"] for e in cli.json("events", "--json")] == ["pending"] * 3 + ["delivered"]


def test_a_delivered_event_can_be_replayed_too(cli: Cli, history: dict[str, int]) -> None:
    assert cli("events", "replay", "1")[0] == 0
    assert cli.json("events", "show", "1", "--json")["state"] == "pending"


@pytest.mark.parametrize(
    ("argv", "errors"),
    [
        (["2"], ["error: event 2 is pending: it is queued already"]),
        (["3", "99"], ["error: no event 99"]),
        (
            ["3", "--dead"],
            ["error: events replay needs event IDs, or --subscription ID, or --dead"],
        ),
        ([], ["error: events replay needs event IDs, or --subscription ID, or --dead"]),
        (["--subscription", "9"], ["error: no subscription 9"]),
        (["three"], ["error: event IDs are numbers, not 'three'"]),
    ],
)
def test_bad_replays_exit_2_and_replay_nothing(
    cli: Cli, history: dict[str, int], argv: list[str], errors: list[str]
) -> None:
    code, out, err = cli("events", "replay", *argv)
    assert (code, out, err.splitlines()) == (2, "", errors)
    assert [e["state"] for e in cli.json("events", "--json")] == [
        "dead", "dead", "pending", "delivered",
    ]  # fmt: skip


def test_replaying_into_a_subscription_in_error_says_it_waits(
    cli: Cli, history: dict[str, int]
) -> None:
    with runtime().db.session() as s:
        subs.set_subscription_state(s, 2, "error", "webhook https://ci.example/hook answered 410")
    code, out, _ = cli("events", "replay", "3")
    assert code == 0
    assert out.splitlines()[1] == (
        "subscription 2 is in error (webhook https://ci.example/hook answered 410): its events "
        "wait for `hipchat-poller subscription resume 2`"
    )


def test_replay_sends_a_delivery_when_the_broker_is_reachable(
    cli: Cli,
    history: dict[str, int],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    data_dir: Path,
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", redis_server.url)
    code, out, _ = cli("events", "replay", "3", "4")
    assert code == 0
    assert out.splitlines()[1] == "sent a delivery for subscription(s) 2 to the workers"
    with redis_server.client() as client:
        [message] = client.lrange("hipchat.actions", 0, -1)
        client.delete("hipchat.actions")
    assert json.loads(message)["headers"]["task"] == "hipchat.deliver"
    assert json.loads(message)["headers"]["argsrepr"] == "[2]"


def test_replay_with_an_unreachable_broker_leaves_it_to_the_relay(
    cli: Cli, history: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:1/0")
    code, out, _ = cli("events", "replay", "3")
    assert code == 0
    assert out.splitlines()[1].startswith("no broker reachable from here: the relay hands them")
