"""The ``hipchat-poller`` command line, in-process (worker.cli.main) against the emulator over
real HTTP, on embedded defaults in a temporary data directory. Exit codes: 0 success, 1 HipChat
or a service said no, 2 bad input. The token is never printed or logged by any command."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.event import listen, remove

from emulator import EmulatorServer
from storage.db import Database, head_revision
from storage.vocabulary import OutboxState
from tasks.poll import poll_connection
from tests.cli_support import ENV_PREFIX, ROOT, TOKEN, Cli, runtime, stored
from tests.storage_support import opened, postgres_schema
from worker import cli_run, schema_check

# -- connections ----------------------------------------------------------------------------


def test_connection_add_with_token(cli: Cli, server: EmulatorServer) -> None:
    code, out, _ = cli("connection", "add", "ops", "--base-url", server.base_url, "--token", TOKEN)

    assert code == 0
    assert out == f"connection ops added (id 1, {server.base_url}); token checked with HipChat\n"


def test_connection_add_from_an_environment_variable(
    cli: Cli, server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_HIPCHAT_TOKEN", TOKEN)
    code, _, err = cli(
        "connection", "add", "a", "--base-url", server.base_url, "--token-env", "MY_HIPCHAT_TOKEN"
    )
    assert code == 0, err

    monkeypatch.setenv(ENV_PREFIX + "TOKEN", TOKEN)  # the default variable
    code, _, err = cli("connection", "add", "b", "--base-url", server.base_url)
    assert code == 0, err

    # Both work: the stored tokens were read from the environment.
    assert cli("user", "a", "@bobb")[0] == 0
    assert cli("user", "b", "@bobb")[0] == 0


def test_connection_add_from_stdin(
    cli: Cli, server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))

    code, _, err = cli("connection", "add", "ops", "--base-url", server.base_url, "--token-stdin")

    assert code == 0, err
    assert cli.json("user", "ops", "@admin")["id"] == 1


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["bad name!", "--token", "t"], "error: bad connection name 'bad name!'"),
        (["ops", "--token", ""], "error: the token must be 1..256 characters without spaces"),
        (["ops", "--token", "two words"], "error: the token must be 1..256 characters"),
        (["ops", "--token-env", "UNSET_VARIABLE"], "error: no token: pass --token, --token-stdin"),
        (["ops"], "set $HIPCHAT_POLLER_TOKEN"),
        (["ops", "--token-stdin"], "error: the token must be 1..256 characters"),
    ],
)
def test_connection_add_bad_input_exits_2(
    cli: Cli, server: EmulatorServer, argv: list[str], error: str
) -> None:
    code, out, err = cli("connection", "add", *argv, "--base-url", server.base_url)

    assert code == 2
    assert error in err
    assert out == ""


def test_an_empty_token_option_does_not_fall_back_to_the_environment(
    cli: Cli, server: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "TOKEN", TOKEN)
    code, _, err = cli("connection", "add", "ops", "--base-url", server.base_url, "--token", "")
    assert code == 2
    assert "the token must be" in err


def test_connection_add_bad_url_and_duplicate_name_exit_2(cli: Cli, ops: EmulatorServer) -> None:
    code, _, err = cli("connection", "add", "x", "--base-url", "ftp://h", "--token", TOKEN)
    assert (code, err) == (2, "error: bad base URL: expected http(s)://host[/path]\n")

    code, _, err = cli("connection", "add", "ops", "--base-url", ops.base_url, "--token", TOKEN)
    duplicate = "a connection named {!r} already exists (names are not case-sensitive)\n"
    assert (code, err) == (2, "error: " + duplicate.format("ops"))
    code, _, err = cli("connection", "add", "OPS", "--base-url", ops.base_url, "--token", TOKEN)
    assert (code, err) == (2, "error: " + duplicate.format("OPS"))
    code, out, _ = cli("connection", "pause", "Ops")  # found in any case
    assert (code, out) == (0, "connection Ops paused\n")


def test_connection_token_options_are_exclusive(cli: Cli, server: EmulatorServer) -> None:
    code, _, err = cli(
        "connection", "add", "x", "--base-url", server.base_url, "--token", "a", "--token-stdin"
    )
    assert code == 2
    assert "not allowed with argument" in err


def test_connection_list_shows_a_failing_room_with_its_error_and_since_when(
    cli: Cli, ops: EmulatorServer
) -> None:
    assert cli("subscribe", "ops", "--event", "room_message", "--room", "Factor", "--log")[0] == 0
    room = int(ops.state.get_room("Factor")["id"])
    rt = runtime()
    poll_connection(rt, 1)  # primes
    ops.state.inject_fault("status", status=500, path_prefix=f"/v2/room/{room}/history")
    assert poll_connection(rt, 1).failing
    rt.close()  # the health record is written
    lines = cli("connection", "list")[1].splitlines()
    assert "failing; room" in lines[0]
    assert re.fullmatch(
        rf"      room {room} failing since 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC, 1 attempts: "
        rf"ServerError: GET /v2/room/{room}/history/latest: HTTP 500: Internal Server Error",
        lines[1],
    ), lines


def test_connection_list_pause_resume_remove(cli: Cli, ops: EmulatorServer) -> None:
    code, out, _ = cli("connection", "list")
    assert code == 0
    assert out.split() == ["1", "ops", "active", ops.base_url, "last", "poll:", "never"]

    assert cli("connection", "pause", "ops")[1] == "connection ops paused\n"
    assert "paused (paused by an operator)" in cli("connection", "list")[1]

    assert cli("connection", "resume", "ops")[1] == "connection ops active\n"
    assert " active " in cli("connection", "list")[1]

    assert cli("connection", "remove", "ops")[1] == "connection ops removed\n"
    assert "no connections" in cli("connection", "list")[1]


@pytest.mark.parametrize("action", ["pause", "resume", "remove"])
def test_connection_commands_on_an_unknown_name_exit_2(cli: Cli, action: str) -> None:
    assert cli("connection", action, "nope") == (2, "", "error: no connection named 'nope'\n")


def test_removing_a_connection_removes_its_subscriptions(cli: Cli, ops: EmulatorServer) -> None:
    assert cli("subscribe", "ops", "--event", "room_created", "--log")[0] == 0
    cli("connection", "remove", "ops")
    assert cli.json("subscriptions", "--json") == []


# -- subscribe ------------------------------------------------------------------------------


def test_subscribe_reply_is_factors_ping_pong(cli: Cli, ops: EmulatorServer) -> None:
    code, out, err = cli(
        "subscribe", "ops", "--event", "room_message", "--room", "Factor",
        "--filter", "ping (.*)", "--reply", "pong {matches[0]}",
    )  # fmt: skip

    assert code == 0, err
    assert out == "subscription 1: room_message room Factor -> action\n"
    factor = ops.state.get_room("Factor")["id"]
    assert stored() == [
        ("room_message", "Factor", factor, "ping (.*)", "action",
         {"action": "post_message", "message": "pong {matches[0]}"}),
    ]  # fmt: skip


def test_subscribe_notify_with_every_option(cli: Cli, ops: EmulatorServer) -> None:
    code, _, err = cli(
        "subscribe", "ops", "--event", "room_file_upload", "--room", "Factor",
        "--notify", "new file {item.file.name}", "--color", "green", "--format", "text",
        "--from", "files", "--alert", "--to-room", "General",
    )  # fmt: skip

    assert code == 0, err
    [(_, _, _, _, kind, target)] = stored()
    assert (kind, target) == (
        "action",
        {
            "action": "send_notification",
            "message": "new file {item.file.name}",
            "color": "green",
            "format": "text",
            "notify": True,
            "from": "files",
            "room": "General",
        },
    )


def test_subscribe_webhook_log_and_handler(
    cli: Cli, ops: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "WEBHOOK_SECRET", "hook-secret-123")
    assert cli("subscribe", "ops", "--event", "room_created", "--webhook", "https://ci.x/h")[0] == 0
    assert cli("subscribe", "ops", "--event", "room_enter", "--event", "room_exit",
               "--room", "Factor", "--log", "--name", "people")[0] == 0  # fmt: skip
    code, _, err = cli(
        "subscribe", "ops", "--event", "room_topic_change", "--room", "Factor",
        "--handler", "tests.handlers_example:topic_watcher",
    )  # fmt: skip
    assert code == 0, err

    rows = stored()
    assert [(r[0], r[4]) for r in rows] == [
        ("room_created", "webhook"),
        ("room_enter", "log"),
        ("room_exit", "log"),
        ("room_topic_change", "handler"),
    ]
    assert rows[0][5]["url"] == "https://ci.x/h"
    assert runtime().cipher.decrypt(rows[0][5]["secret_encrypted"]) == "hook-secret-123"
    assert rows[3][5] == {"handler": "tests.handlers_example:topic_watcher"}
    assert [r[0] for r in stored("people-room_enter")] == ["room_enter"]


def test_subscribe_bad_input_lists_every_problem_and_exits_2(cli: Cli, ops: EmulatorServer) -> None:
    code, out, err = cli(
        "subscribe", "ops", "--event", "room_mesage", "--event", "room_created",
        "--room", "Factor", "--filter", r"(a)\1", "--notify", "{item.__class__}",
        "--color", "blue",
    )  # fmt: skip

    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "error: unknown event 'room_mesage'; expected one of room_archived, room_created, "
        "room_deleted, room_enter, room_exit, room_file_upload, room_message, "
        "room_notification, room_topic_change, room_unarchived",
        r"error: invalid filter '(a)\\1': invalid escape sequence: \1; backreferences are not "
        "supported (RE2 does not backtrack)",
        "error: message template: field {item.__class__} at position 0: '__class__' is not an "
        "event field (names starting with '_' are refused)",
        "error: color must be one of yellow, green, red, purple, gray, random, not 'blue'",
        "error: room_created watches the room list and takes no room",
        "error: a filter applies only to room_message",
    ]
    assert stored() == []


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--event", "room_message", "--room", "Nowhere", "--log"],
         "error: room 'Nowhere' not found on this connection"),
        (["--event", "room_message", "--log"], "error: room_message needs a room (name or id)"),
        (["--event", "room_created", "--webhook", "ftp://x"],
         "error: webhook url must be http(s)://host/..."),
        (["--event", "room_created", "--log", "--name", "a b"],
         "error: bad subscription name 'a b'"),
        (["--event", "room_created", "--handler", "nocolon"],
         "error: handler target needs 'handler' as 'module:function'"),
    ],
)  # fmt: skip
def test_subscribe_bad_target_or_room_exits_2(
    cli: Cli, ops: EmulatorServer, argv: list[str], error: str
) -> None:
    code, _, err = cli("subscribe", "ops", *argv)
    assert code == 2
    assert err.startswith(error)
    assert stored() == []


def test_subscribe_needs_exactly_one_target(cli: Cli, ops: EmulatorServer) -> None:
    code, _, err = cli("subscribe", "ops", "--event", "room_created")
    assert code == 2
    assert "one of the arguments --webhook --log --reply --notify --handler is required" in err


def test_subscribe_to_an_unknown_connection_exits_2(cli: Cli) -> None:
    code, _, err = cli("subscribe", "nope", "--event", "room_created", "--log")
    assert (code, err) == (2, "error: no connection named 'nope'\n")


# -- subscriptions / unsubscribe -------------------------------------------------------------


@pytest.fixture
def three_subs(cli: Cli, ops: EmulatorServer) -> EmulatorServer:
    url = "https://user:hunter2@ci.example/hook?key=qs-secret"
    for argv in (
        ["--event", "room_message", "--room", "Factor", "--filter", "ping (.*)",
         "--reply", "pong {matches[0]}"],
        ["--event", "room_created", "--webhook", url, "--secret", "hook-secret-123"],
        ["--event", "room_enter", "--room", "Factor", "--log"],
    ):  # fmt: skip
        code, _, err = cli("subscribe", "ops", *argv)
        assert code == 0, err
    return ops


SECRETS = ("hook-secret-123", "user:", "hunter2", "qs-secret")


def test_subscriptions_as_text(cli: Cli, three_subs: EmulatorServer) -> None:
    code, out, _ = cli("subscriptions")

    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == [
        "ID",
        "NAME",
        "CONNECTION",
        "EVENT",
        "ROOM",
        "FILTER",
        "TARGET",
        "STATE",
    ]
    assert len(lines) == 3
    assert lines[0].split() == [
        "1", "-", "ops", "room_message", "Factor", "ping", "(.*)", "reply", "'pong",
        "{matches[0]}'", "active",
    ]  # fmt: skip
    assert lines[1].split()[3:] == [
        "room_created", "-", "-", "webhook", "https://***@ci.example/hook?***", "(signed)",
        "active",
    ]  # fmt: skip
    assert not [s for s in SECRETS if s in out]


def test_subscriptions_as_json_never_show_a_secret(cli: Cli, three_subs: EmulatorServer) -> None:
    code, out, _ = cli("subscriptions", "ops", "--json")

    assert code == 0
    views = json.loads(out)
    assert [v["event"] for v in views] == ["room_message", "room_created", "room_enter"]
    assert views[0]["room_id"] == three_subs.state.get_room("Factor")["id"]
    assert views[0]["primed"] is False
    assert views[1]["target"] == {"url": "https://***@ci.example/hook?***", "signed": True}
    assert views[1]["connection"] == {"id": 1, "name": "ops"}
    assert not [s for s in SECRETS if s in out]


def test_subscriptions_of_an_unknown_connection_exit_2(cli: Cli) -> None:
    assert cli("subscriptions", "nope") == (2, "", "error: no connection named 'nope'\n")


def test_unsubscribe(cli: Cli, three_subs: EmulatorServer) -> None:
    assert cli("unsubscribe", "2") == (0, "subscription 2 removed\n", "")
    assert [v["id"] for v in cli.json("subscriptions", "--json")] == [1, 3]
    assert cli("unsubscribe", "2") == (2, "", "error: no subscription 2\n")
    assert cli("unsubscribe", "two")[0] == 2


# -- actions ----------------------------------------------------------------------------------


def test_users_of_a_private_and_a_public_room(cli: Cli, ops: EmulatorServer) -> None:
    private = cli.json("users", "ops", "Ops Room")
    ops.state.enter_room("General", "bobb")
    public = cli.json("users", "ops", "General")

    assert private["source"] == "members"
    assert {u["mention_name"] for u in private["items"]} == {"admin", "AliceA", "bobb"}
    assert public["source"] == "participants"
    assert [u["mention_name"] for u in public["items"]] == ["bobb"]


def test_user_by_id_email_and_mention(cli: Cli, ops: EmulatorServer) -> None:
    for ref in ("2", "alicea@example.com", "@AliceA", "AliceA"):
        assert cli.json("user", "ops", ref)["name"] == "Alice Anders"


def test_post_and_notify(cli: Cli, ops: EmulatorServer) -> None:
    posted = cli.json("post", "ops", "Factor", "hello from the cli")
    notified = cli.json(
        "notify", "ops", "Factor", "<b>built</b>", "--color", "random", "--format", "html",
        "--notify", "--from", "CI",
    )  # fmt: skip

    message, notification = ops.state.history("Factor")
    assert posted == {"id": message["id"], "timestamp": message["date"]}
    assert message["message"] == "hello from the cli"
    assert notified == {"sent": True, "color": "random", "message_format": "html", "notify": True}
    assert notification["color"] in {"yellow", "green", "red", "purple", "gray"}
    assert notification["from"] == "CI"


def test_an_action_waits_for_a_spent_budget_and_says_so(
    cli: Cli, ops: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting is not failure: with the budget spent, ``post`` waits for its call (up to
    ``--wait``); ``--wait 0`` fails at once, and a wait it will not make reserves nothing."""
    for name, value in (("CAPACITY", "1"), ("WINDOW_SECONDS", "1"), ("MARGIN_SECONDS", "0")):
        monkeypatch.setenv(f"HIPCHAT_POLLER_BUCKET_{name}", value)
    assert cli("post", "ops", "Factor", "first")[0] == 0  # may wait for the fixture's call
    code, _, err = cli("post", "ops", "Factor", "refused", "--wait", "0")
    assert code == 1
    assert "has used its HipChat call budget" in err
    assert "retry in" in err
    code, _, err = cli("post", "ops", "Factor", "refused", "--wait", "0.01")
    assert code == 1
    assert "retry in" in err
    assert runtime().budget.usage(1).reserved == 0  # a wait it would not make reserved nothing
    code, _, err = cli("post", "ops", "Factor", "waited", "--wait", "5")
    assert code == 0, err
    assert err.startswith("the budget is spent: waiting ")
    assert [m["message"] for m in ops.state.history("Factor")] == ["first", "waited"]
    code, _, err = cli("post", "ops", "Factor", "x", "--wait", "soon")
    assert code == 2
    assert "'soon' is not a number of seconds in 0..3600" in err


def test_add_member(cli: Cli, ops: EmulatorServer) -> None:
    carol = ops.state.create_user("Carol Clark", "carol")

    assert cli.json("add-member", "ops", "Ops Room", "carol") == {
        "added": True,
        "room": 10002,
        "user": "@carol",
    }
    with ops.state.lock:
        assert carol["id"] in ops.state.find_room("Ops Room").members


@pytest.mark.parametrize(
    ("argv", "code", "errors"),
    [
        (["post", "ops", "Factor", ""], 2, ["error: message must be 1..1000 characters (got 0)"]),
        (["post", "ops", "Factor", "x" * 1001], 2,
         ["error: message must be 1..1000 characters (got 1001)"]),
        (["notify", "ops", "Factor", "", "--color", "blue", "--format", "md", "--from", "f" * 65],
         2, ["error: message must be 1..10000 characters (got 0)",
             "error: color must be one of yellow, green, red, purple, gray, random, not 'blue'",
             "error: message_format must be text or html, not 'md'",
             "error: from must be text of at most 64 characters"]),
        (["add-member", "ops", "General", "@bobb"], 2,
         ["error: room 'General' is public; only private rooms have members to add"]),
        (["users", "nope", "Factor"], 2, ["error: no connection 'nope'"]),
        # An unknown room or user is bad input, like an unknown connection.
        (["users", "ops", "Nowhere"], 2,
         ["error: GET /v2/room/Nowhere: HTTP 404: Room Nowhere not found"]),
        (["user", "ops", "@ghost"], 2, ["error: GET /v2/user/%40ghost: HTTP 404: User not found"]),
        (["post", "ops"], 2, None),
    ],
)  # fmt: skip
def test_action_errors(
    cli: Cli, ops: EmulatorServer, argv: list[str], code: int, errors: list[str] | None
) -> None:
    got, out, err = cli(*argv)

    assert got == code
    assert out == ""
    if errors is not None:
        assert err.splitlines() == errors


# -- migrate, status, handlers ----------------------------------------------------------------


def test_migrate_is_repeatable(cli: Cli, data_dir: Path) -> None:
    assert cli("migrate") == (0, "database schema is up to date (sqlite)\n", "")
    assert cli("migrate")[0] == 0
    assert (data_dir / "hipchat-poller.db").exists()


# -- the schema check: only `migrate` upgrades; a first embedded use creates ---------------------
NO_SCHEMA = "error: the database has no schema yet: run `hipchat-poller migrate`\n"
NEXT = "0099_next"  # a migration this code would ship and the database has not had


def _no_upgrade(self: Database, revision: str = "head") -> None:
    raise AssertionError("only `migrate` (and a first embedded use) may run the migrations")


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("must not start")


def revision(url: str) -> str | None:
    with opened(url) as database:
        return database.current_revision()


def table_names(url: str) -> list[str]:
    with opened(url) as database:
        return inspect(database.engine).get_table_names()


@pytest.fixture
def empty_postgres(
    data_dir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """HIPCHAT_POLLER_DATABASE_URL names a new, empty PostgreSQL schema."""
    with postgres_schema(postgres_url) as url:
        monkeypatch.setenv(ENV_PREFIX + "DATABASE_URL", url)
        yield url


@pytest.mark.parametrize(
    "argv",
    [["connection", "list"], ["subscriptions"], ["status"], ["user", "ops", "@admin"],
     ["apply", "recipes.yml"], ["handlers", "sync", "tests.handlers_example"]],
)  # fmt: skip
def test_a_command_on_an_empty_postgres_database_says_migrate_and_creates_nothing(
    cli: Cli, empty_postgres: str, argv: list[str]
) -> None:
    assert cli(*argv) == (1, "", NO_SCHEMA)
    assert table_names(empty_postgres) == []


def test_a_listing_on_an_out_of_date_postgres_database_says_migrate_and_changes_nothing(
    cli: Cli, empty_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli("migrate") == (0, "database schema is up to date (postgresql)\n", "")
    head = head_revision()
    monkeypatch.setattr(schema_check, "head_revision", lambda: NEXT)  # this code moved on
    monkeypatch.setattr(Database, "upgrade", _no_upgrade)

    assert cli("connection", "list") == (
        1,
        "",
        f"error: the database schema is out of date (at {head}, this code needs {NEXT}): "
        "run `hipchat-poller migrate`\n",
    )
    assert revision(empty_postgres) == head


def test_migrate_then_the_command_works(
    cli: Cli, empty_postgres: str, server: EmulatorServer
) -> None:
    assert cli("connection", "add", "ops", "--base-url", server.base_url, "--token", TOKEN) == (
        1,
        "",
        NO_SCHEMA,
    )

    assert cli("migrate") == (0, "database schema is up to date (postgresql)\n", "")
    code, _, err = cli("connection", "add", "ops", "--base-url", server.base_url, "--token", TOKEN)

    assert code == 0, err
    assert " ops " in cli("connection", "list")[1]
    assert revision(empty_postgres) == head_revision()


def test_a_database_newer_than_the_code_is_refused(cli: Cli, empty_postgres: str) -> None:
    cli("migrate")
    with opened(empty_postgres) as database, database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))

    assert cli("status") == (
        1,
        "",
        f"error: the database schema (at 9999_future) is newer than this code "
        f"(at {head_revision()}): run a newer hipchat-poller\n",
    )
    code, _, err = cli("migrate")
    assert code == 1
    assert err.startswith("error: cannot migrate the database: ")


def test_worker_beat_and_run_with_redis_refuse_an_unmigrated_database(
    cli: Cli, empty_postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PREFIX + "REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setattr(cli_run, "_celery", _never)
    monkeypatch.setattr(cli_run, "EmbeddedWorker", _never)

    for command in ("worker", "beat", "run"):
        assert cli(command) == (1, "", NO_SCHEMA)
    assert table_names(empty_postgres) == []


def test_a_fresh_embedded_data_dir_works_with_connection_add_directly(
    cli: Cli, data_dir: Path, server: EmulatorServer
) -> None:
    assert list(data_dir.iterdir()) == []

    code, out, err = cli(
        "connection", "add", "ops", "--base-url", server.base_url, "--token", TOKEN
    )

    assert (code, err) == (0, "")
    assert out.startswith("connection ops added")
    assert revision(f"sqlite:///{data_dir / 'hipchat-poller.db'}") == head_revision()


def test_an_up_to_date_database_is_checked_on_one_connection_without_alembic(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("migrate")
    monkeypatch.setattr(Database, "upgrade", _no_upgrade)
    connects: list[object] = []

    def count(dbapi_connection: object, _record: object) -> None:
        connects.append(dbapi_connection)

    listen(Engine, "connect", count)
    try:
        assert cli("connection", "list")[0] == 0
    finally:
        remove(Engine, "connect", count)
    assert len(connects) == 1  # the check's connection, then reused by the listing


def test_an_embedded_database_is_created_but_never_upgraded_by_a_command(
    cli: Cli, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("migrate")
    monkeypatch.setattr(schema_check, "head_revision", lambda: NEXT)
    monkeypatch.setattr(Database, "upgrade", _no_upgrade)

    code, _, err = cli("connection", "list")

    assert code == 1
    assert "is out of date" in err


def test_an_empty_database_named_by_url_is_not_created(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv(ENV_PREFIX + "DATABASE_URL", url)

    assert cli("connection", "list") == (1, "", NO_SCHEMA)
    assert table_names(url) == []


@pytest.mark.parametrize(
    ("current", "message"),
    [
        (None, "the database has no schema yet: run `hipchat-poller migrate`"),
        ("0001", "the database schema is out of date (at 0001, this code needs 0002): "
                 "run `hipchat-poller migrate`"),
        ("0003", "the database schema (at 0003) is newer than this code (at 0002): "
                 "run a newer hipchat-poller"),
    ],
)  # fmt: skip
def test_what_a_schema_mismatch_tells_a_person(current: str | None, message: str) -> None:
    assert schema_check.mismatch(current, "0002", {"0001", "0002"}) == message


def test_status(cli: Cli, three_subs: EmulatorServer) -> None:
    cli("connection", "pause", "ops")

    code, out, _ = cli("status", "--json")

    assert code == 0  # paused is not failing: a person paused it
    report = json.loads(out)
    [connection] = report["connections"]
    assert (connection["name"], connection["state"], connection["last_ok_at"]) == (
        "ops",
        "paused",
        None,
    )
    assert [s["state"] for s in report["subscriptions"]] == ["active"] * 3
    assert report["outbox"] == dict.fromkeys(
        (s.value for s in OutboxState), 0
    )  # every state listed, nothing polled yet
    assert (report["healthy"], report["problems"]) == (True, [])


def test_handlers_sync(cli: Cli, ops: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli("handlers", "sync") == (
        2,
        "",
        "error: name a module, or set HIPCHAT_POLLER_HANDLERS_MODULE\n",
    )

    code, out, _ = cli("handlers", "sync", "tests.handlers_example")
    assert code == 0
    assert out.splitlines() == [
        "added handler:tests.handlers_example:pong",
        "added handler:tests.handlers_example:topic_watcher",
    ]

    monkeypatch.setenv(ENV_PREFIX + "HANDLERS_MODULE", "tests.handlers_example")
    assert cli("handlers", "sync") == (0, "no changes\n", "")

    code, _, err = cli("handlers", "sync", "no_such_handlers_module")
    assert code == 2
    assert err.startswith("error: cannot import handlers module 'no_such_handlers_module'")


# -- the token and secrets ----------------------------------------------------------------------


def test_no_command_shows_the_token(cli: Cli, three_subs: EmulatorServer, data_dir: Path) -> None:
    for argv in (
        ["connection", "list"], ["subscriptions"], ["subscriptions", "--json"], ["status"],
        ["users", "ops", "Ops Room"], ["user", "ops", "1"], ["post", "ops", "Factor", "hi"],
        ["notify", "ops", "Factor", "hi"], ["add-member", "ops", "Ops Room", "@admin"],
        ["users", "ops", "Nowhere"], ["--log-level", "DEBUG", "user", "ops", "@nobody"],
    ):  # fmt: skip
        cli(*argv)

    output = cli.all_output()
    assert "error: GET /v2/room/Nowhere: HTTP 404" in output  # errors were captured ...
    assert "hipchat GET /v2/user/%40nobody -> 404" in output  # ... and the client's DEBUG log
    assert TOKEN not in output
    # At rest the token is encrypted too.
    assert TOKEN.encode() not in (data_dir / "hipchat-poller.db").read_bytes()


# -- parsing and the Celery passthrough ---------------------------------------------------------


def test_usage_errors_return_2_and_help_returns_0(cli: Cli) -> None:
    assert cli("no-such-command")[0] == 2
    assert cli("--log-level", "LOUD", "status")[0] == 2
    code, out, _ = cli("--help")
    assert code == 0
    assert "Polling triggers and actions" in out


def test_worker_and_beat_need_a_shared_redis(cli: Cli) -> None:
    for command in ("worker", "beat"):
        code, _, err = cli(command)
        assert code == 2
        assert "needs HIPCHAT_POLLER_REDIS_URL" in err


def test_bad_settings_are_reported_not_raised(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "POLL_INTERVAL_SECONDS", "soon")
    for argv in (["worker"], ["status"]):
        assert cli(*argv) == (
            2,
            "",
            "error: HIPCHAT_POLLER_POLL_INTERVAL_SECONDS: expected a number, got 'soon'\n",
        )


def test_worker_and_beat_help_is_celerys(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env[ENV_PREFIX + "DATA_DIR"] = str(data_dir)
    processes = {  # both at once: each is a Python start-up plus Celery's import
        name: subprocess.Popen(
            [sys.executable, "-m", "worker.cli", name, "--help"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for name in ("worker", "beat")
    }  # fmt: skip
    outputs = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err.decode()
        outputs[name] = out.decode()

    assert outputs["worker"].startswith("Usage: hipchat-poller worker [OPTIONS]")
    assert "--concurrency" in outputs["worker"]
    assert outputs["beat"].startswith("Usage: hipchat-poller beat [OPTIONS]")
    assert "--scheduler" in outputs["beat"]
    assert list(data_dir.iterdir()) == []  # --help touches no database
