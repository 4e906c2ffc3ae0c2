"""``hipchat-poller apply FILE``: the recipes file, its errors, and making the database match.

SQLite in ``tmp_path``; rooms resolved against the HipChat emulator over a real socket, or
against a closed port (rooms then stay unresolved, which is also legitimate). No sleeps.
"""

from __future__ import annotations

import argparse
import logging
import socket
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from emulator import EmulatorServer
from storage import connections as conns
from storage import subscriptions as subs
from storage.crypto import generate_key
from storage.errors import ValidationError
from storage.models import Connection, Subscription
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker import cli_recipes
from worker.cli_recipes import register
from worker.recipes_apply import apply
from worker.recipes_load import load_recipes
from worker.recipes_plan import StoredConnection, StoredSubscription, changed_fields, plan

OPS_TOKEN = "ops-token-SECRET-0001"
NEW_OPS_TOKEN = "ops-token-SECRET-0002"
LAB_TOKEN = "lab-token-SECRET-0003"
DEFAULT_TOKEN = "factor-api-key-SECRET-0004"
HOOK_SECRET = "hook-secret-SECRET-0005"
SECRETS = (OPS_TOKEN, NEW_OPS_TOKEN, LAB_TOKEN, DEFAULT_TOKEN, HOOK_SECRET)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def rt(tmp_path: Path, key_prefix: str) -> Iterator[Runtime]:
    settings = Settings(
        data_dir=str(tmp_path / "data"), secret_key=generate_key(), redis_key_prefix=key_prefix
    )
    runtime = Runtime(settings)
    runtime.db.upgrade()
    yield runtime
    runtime.close()


@pytest.fixture
def closed_url() -> str:
    """A loopback URL nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIPCHAT_OPS_TOKEN", OPS_TOKEN)
    monkeypatch.setenv("HOOK_SECRET", HOOK_SECRET)


@pytest.fixture
def factor_room(emulator: EmulatorServer) -> int:
    return int(emulator.state.create_room("Factor")["id"])


@pytest.fixture
def ops_token(emulator: EmulatorServer) -> str:
    token = emulator.state.create_token("admin", token=OPS_TOKEN)
    emulator.state.create_token("admin", token=NEW_OPS_TOKEN)
    return token


def write(directory: Path, text: str, name: str = "recipes.yml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def recipes_file(directory: Path, base_url: str, **changes: str) -> Path:
    """The documented example; ``changes`` replaces {placeholders} in it."""
    values = {
        "base_url": base_url,
        "room": "Factor",
        "filter": "ping (.*)",
        "message": "pong {matches[0]}",
        "events": "[room_created, room_archived]",
        "extra": "",
    } | changes
    text = """
        connections:
          ops:
            base_url: {base_url}
            token_env: HIPCHAT_OPS_TOKEN
        subscriptions:
          - name: ping-pong
            connection: ops
            event: room_message
            room: {room}
            filter: "{filter}"
            action: {{action: post_message, message: "{message}"}}
          - name: files-to-ci
            connection: ops
            event: room_file_upload
            room: {room}
            webhook: {{url: "https://ci.example/hook", secret_env: HOOK_SECRET}}
          - name: rooms
            connection: ops
            event: {events}
            log: true
        {extra}
        """
    return write(directory, text.format(**values))


def stored(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Every subscription by name, with its connection's name: what apply may change."""
    with rt.db.session() as s:
        names = {c.id: c.name for c in conns.list_connections(s)}
        return {
            str(row.name): {
                "id": row.id,
                "connection": names[row.connection_id],
                "event": row.event,
                "room": row.room,
                "room_id": row.room_id,
                "room_name": row.room_name,
                "filter": row.filter,
                "target_kind": row.target_kind,
                "target": dict(row.target),
                "backfill": row.backfill,
                "include_own": row.include_own,
                "primed_at": row.primed_at,
            }
            for row in subs.list_subscriptions(s)
        }


def connections(rt: Runtime) -> dict[str, tuple[str, str]]:
    with rt.db.session() as s:
        return {
            c.name: (c.base_url, conns.decrypt_token(c, rt.cipher))
            for c in conns.list_connections(s)
        }


def database_rows(rt: Runtime) -> list[tuple[Any, ...]]:
    """Everything apply may touch, raw (ciphertexts included): to prove nothing changed."""
    with rt.db.session() as s:
        rows: list[tuple[Any, ...]] = [
            (c.id, c.name, c.base_url, c.token_encrypted, c.state)
            for c in s.scalars(select(Connection).order_by(Connection.id))
        ]
        rows += [
            (r.id, r.connection_id, r.name, r.event, r.room, r.room_id, r.filter, r.target)
            for r in s.scalars(select(Subscription).order_by(Subscription.id))
        ]
        return rows


# -- applying a good file ---------------------------------------------------------------------
def test_good_file_applied_twice_second_run_has_no_changes(
    rt: Runtime, tmp_path: Path, emulator: EmulatorServer, factor_room: int, ops_token: str
) -> None:
    path = recipes_file(tmp_path, emulator.base_url)

    assert apply(rt, path) == [
        "+ connection ops",
        "+ subscription files-to-ci",
        "+ subscription ping-pong",
        "+ subscription rooms:room_archived",
        "+ subscription rooms:room_created",
    ]
    assert apply(rt, path) == []

    rows = stored(rt)
    assert set(rows) == {
        "recipe:ping-pong",
        "recipe:files-to-ci",
        "recipe:rooms:room_created",
        "recipe:rooms:room_archived",
    }
    ping = rows["recipe:ping-pong"]
    assert (ping["event"], ping["room"], ping["room_id"]) == ("room_message", "Factor", factor_room)
    assert ping["room_name"] == "Factor"  # HipChat's name, so a poll need not ask again
    assert ping["filter"] == "ping (.*)"
    assert ping["target"] == {"action": "post_message", "message": "pong {matches[0]}"}
    hook = rows["recipe:files-to-ci"]
    assert hook["target"]["url"] == "https://ci.example/hook"
    assert rt.cipher.decrypt(hook["target"]["secret_encrypted"]) == HOOK_SECRET
    assert rows["recipe:rooms:room_created"]["room"] is None
    assert connections(rt) == {"ops": (emulator.base_url, OPS_TOKEN)}


def test_unknown_room_on_a_new_connection_rolls_everything_back(
    rt: Runtime, tmp_path: Path, emulator: EmulatorServer, ops_token: str
) -> None:
    path = recipes_file(tmp_path, emulator.base_url, room="No Such Room")

    with pytest.raises(ValidationError) as caught:
        apply(rt, path)

    # Both subscriptions name the room on line 9 and 15; each is reported where it is.
    assert caught.value.errors == [
        f"{path}:9: subscription ping-pong: room 'No Such Room' not found on connection ops",
        f"{path}:15: subscription files-to-ci: room 'No Such Room' not found on connection ops",
    ]
    assert database_rows(rt) == []


def test_unknown_room_on_an_existing_connection_stops_before_any_write(
    rt: Runtime, tmp_path: Path, emulator: EmulatorServer, factor_room: int, ops_token: str
) -> None:
    apply(rt, recipes_file(tmp_path, emulator.base_url))
    before = database_rows(rt)
    calls = len(emulator.state.call_log.select())

    path = recipes_file(tmp_path, emulator.base_url, room="Gone", filter="other (.*)")
    with pytest.raises(ValidationError) as caught:
        apply(rt, path)

    assert [e.split(": ", 1)[0] for e in caught.value.errors] == [f"{path}:9", f"{path}:15"]
    assert database_rows(rt) == before
    assert len(emulator.state.call_log.select()) == calls + 1  # one lookup per distinct room


def test_rooms_are_resolved_through_the_connections_bucket(
    rt: Runtime, tmp_path: Path, emulator: EmulatorServer, factor_room: int, ops_token: str
) -> None:
    apply(rt, recipes_file(tmp_path, emulator.base_url))
    with rt.db.session() as s:
        conn = conns.require_connection(s, "ops")
        conn_id = conn.id
    # One call, although two subscriptions watch the room: it was counted in the bucket.
    assert rt.budget.usage(conn_id).used == 1


def test_unreachable_hipchat_stores_rooms_unresolved(
    rt: Runtime, tmp_path: Path, closed_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tasks.subscriptions_api")
    path = recipes_file(tmp_path, closed_url)

    assert len(apply(rt, path)) == 5

    rows = stored(rt)
    assert rows["recipe:ping-pong"]["room"] == "Factor"
    assert rows["recipe:ping-pong"]["room_id"] is None
    assert "the first poll resolves them" in caplog.text
    assert apply(rt, path) == []


# -- updates and removals -------------------------------------------------------------------
def test_target_filter_and_backfill_change_in_place_and_keep_priming(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    before = stored(rt)["recipe:ping-pong"]
    primed = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with rt.db.session() as s:
        subs.mark_primed(s, [before["id"]], primed)

    path = recipes_file(tmp_path, closed_url, filter="pong (.*)", message="ping {matches[0]}")
    assert apply(rt, path) == ["~ subscription ping-pong (target, filter)"]

    after = stored(rt)["recipe:ping-pong"]
    assert (after["id"], after["primed_at"]) == (before["id"], primed)
    assert after["filter"] == "pong (.*)"
    assert after["target"]["message"] == "ping {matches[0]}"
    assert apply(rt, path) == []


def test_backfill_and_webhook_secret_changes_are_updates(
    rt: Runtime, tmp_path: Path, closed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    before = stored(rt)
    monkeypatch.setenv("HOOK_SECRET", "another-secret")
    extra = "  - {name: later, connection: ops, event: room_enter, room: Factor, log: true}"
    path = recipes_file(tmp_path, closed_url, extra=extra)

    assert apply(rt, path) == ["~ subscription files-to-ci (target)", "+ subscription later"]

    hook = stored(rt)["recipe:files-to-ci"]
    assert hook["id"] == before["recipe:files-to-ci"]["id"]
    assert rt.cipher.decrypt(hook["target"]["secret_encrypted"]) == "another-secret"
    write(
        tmp_path,
        path.read_text().replace("log: true}", "log: true, backfill: 20}"),
    )
    assert apply(rt, path) == ["~ subscription later (backfill)"]
    assert stored(rt)["recipe:later"]["backfill"] == 20


def test_include_own_is_an_update_in_place(rt: Runtime, tmp_path: Path, closed_url: str) -> None:
    extra = "  - {name: mirror, connection: ops, event: room_notification, room: Factor, log: true}"
    path = recipes_file(tmp_path, closed_url, extra=extra)
    apply(rt, path)
    before = stored(rt)["recipe:mirror"]
    assert before["include_own"] is False
    write(tmp_path, path.read_text().replace("log: true}", "log: true, include_own: true}"))
    assert apply(rt, path) == ["~ subscription mirror (include_own)"]
    after = stored(rt)["recipe:mirror"]
    assert (after["id"], after["include_own"]) == (before["id"], True)
    assert apply(rt, path) == []


def test_room_change_recreates_so_it_primes_again(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    before = stored(rt)
    with rt.db.session() as s:
        subs.mark_primed(s, [before["recipe:ping-pong"]["id"]], datetime.now(UTC))

    assert apply(rt, recipes_file(tmp_path, closed_url, room="Other")) == [
        "~ subscription files-to-ci (room; re-created)",
        "~ subscription ping-pong (room; re-created)",
    ]

    after = stored(rt)["recipe:ping-pong"]
    assert after["id"] != before["recipe:ping-pong"]["id"]
    assert (after["room"], after["primed_at"]) == ("Other", None)


def test_event_change_recreates_and_event_lists_expand(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    created = stored(rt)["recipe:rooms:room_created"]["id"]

    path = recipes_file(tmp_path, closed_url, events="[room_created, room_deleted]")
    assert apply(rt, path) == [
        "- subscription rooms:room_archived",
        "+ subscription rooms:room_deleted",
    ]
    assert stored(rt)["recipe:rooms:room_created"]["id"] == created

    text = path.read_text().replace("event: room_file_upload", "event: room_notification")
    write(tmp_path, text)
    assert apply(rt, path) == ["~ subscription files-to-ci (event; re-created)"]
    assert stored(rt)["recipe:files-to-ci"]["event"] == "room_notification"


def test_subscriptions_gone_from_the_file_are_removed_and_others_are_kept(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    with rt.db.session() as s:
        ops = conns.require_connection(s, "ops")
        subs.add_subscription(s, ops.id, "room_created", target_kind="log", target={}, name="mine")

    path = write(
        tmp_path,
        f"""
        connections:
          ops: {{base_url: "{closed_url}", token_env: HIPCHAT_OPS_TOKEN}}
        subscriptions:
          - {{name: files-to-ci, connection: ops, event: room_file_upload, room: Factor,
              webhook: {{url: "https://ci.example/hook", secret_env: HOOK_SECRET}}}}
        """,
    )
    assert apply(rt, path) == [
        "- subscription ping-pong",
        "- subscription rooms:room_archived",
        "- subscription rooms:room_created",
    ]
    assert set(stored(rt)) == {"recipe:files-to-ci", "mine"}

    write(tmp_path, "subscriptions: []\n")
    assert apply(rt, path) == ["- subscription files-to-ci"]
    assert set(stored(rt)) == {"mine"}
    assert set(connections(rt)) == {"ops"}  # not named in the file, not pruned: kept


def test_moving_a_subscription_to_another_connection_recreates_it(
    rt: Runtime, tmp_path: Path, closed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAB_TOKEN", LAB_TOKEN)
    lab = f"  lab: {{base_url: '{closed_url}/lab', token_env: LAB_TOKEN}}"
    text = recipes_file(tmp_path, closed_url).read_text()
    path = write(tmp_path, text.replace("subscriptions:", lab + "\nsubscriptions:"))
    apply(rt, path)

    moved = path.read_text().replace(
        "    connection: ops\n    event: room_message",
        "    connection: lab\n    event: room_message",
    )
    write(tmp_path, moved)
    assert apply(rt, path) == ["~ subscription ping-pong (connection; re-created)"]
    assert stored(rt)["recipe:ping-pong"]["connection"] == "lab"
    assert apply(rt, path) == []


def test_connection_token_and_base_url_changes(
    rt: Runtime, tmp_path: Path, closed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    with rt.db.session() as s:
        ops = conns.require_connection(s, "ops")
        conns.set_connection_state(s, ops.id, "auth_failed", "401 from HipChat")

    monkeypatch.setenv("HIPCHAT_OPS_TOKEN", NEW_OPS_TOKEN)
    assert apply(rt, recipes_file(tmp_path, closed_url)) == ["~ connection ops (token)"]
    assert connections(rt)["ops"] == (closed_url, NEW_OPS_TOKEN)
    with rt.db.session() as s:
        assert conns.require_connection(s, "ops").state == "active"  # a new token answers it

    path = recipes_file(tmp_path, closed_url + "/hipchat/")
    assert apply(rt, path) == ["~ connection ops (base_url)"]
    assert connections(rt)["ops"] == (closed_url + "/hipchat", NEW_OPS_TOKEN)
    assert apply(rt, path) == []


def test_connections_not_in_the_file_go_only_when_pruning(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    with rt.db.session() as s:
        legacy = conns.add_connection(s, "legacy", closed_url, "legacy-token", rt.cipher)
        subs.add_subscription(s, legacy.id, "room_created", target_kind="log", target={})
    path = recipes_file(tmp_path, closed_url)
    apply(rt, path)
    assert set(connections(rt)) == {"legacy", "ops"}

    assert apply(rt, path, dry_run=True, prune_connections=True) == [
        "- connection legacy (with its subscriptions)"
    ]
    assert apply(rt, path, prune_connections=True) == [
        "- connection legacy (with its subscriptions)"
    ]
    assert set(connections(rt)) == {"ops"}
    assert all(row["connection"] == "ops" for row in stored(rt).values())


def test_a_key_change_is_repaired_by_applying_again(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    path = recipes_file(tmp_path, closed_url)
    apply(rt, path)
    rotated = Runtime(rt.settings.with_(secret_key=generate_key()))
    try:
        # Stored values the new key cannot read count as changed and are stored afresh.
        assert apply(rotated, path) == [
            "~ connection ops (token)",
            "~ subscription files-to-ci (target)",
        ]
        assert apply(rotated, path) == []
    finally:
        rotated.db.dispose()


# -- dry run ----------------------------------------------------------------------------------
def test_dry_run_lists_the_changes_changes_nothing_and_calls_no_one(
    rt: Runtime, tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = recipes_file(tmp_path, emulator.base_url, room="Not Even There")

    def no_client(*args: object, **kwargs: object) -> None:
        raise AssertionError("a dry run must not call HipChat")

    monkeypatch.setattr(Runtime, "client", no_client)
    lines = apply(rt, path, dry_run=True)

    assert lines[0] == "+ connection ops"
    assert len(lines) == 5
    assert database_rows(rt) == []
    assert emulator.state.call_log.select() == []


def test_dry_run_still_refuses_a_bad_file(rt: Runtime, tmp_path: Path) -> None:
    path = write(tmp_path, "connections: {ops: {base_url: 'http://h', token_env: NOT_SET_X}}\n")
    with pytest.raises(ValidationError) as caught:
        apply(rt, path, dry_run=True)
    assert caught.value.errors == [
        f"{path}:1: connection ops: environment variable NOT_SET_X is not set"
    ]


# -- errors -----------------------------------------------------------------------------------
BAD_FILE = """
    credentials: creds.yml
    connections:
      ops:
        base_url: ftp://somewhere
        token_env: MISSING_TOKEN
        token: do-not-put-it-here
      lab:
        base_url: http://lab.example
        credentials: nope
    surprise: 1
    subscriptions:
      - name: ping
        connection: ops
        event: room_mesage
        room: Factor
        log: true
      - name: ping
        connection: elsewhere
        event: room_message
        room: Factor
        filter: "ping ("
        action: {action: post_message, message: "pong {matches[0}"}
      - name: rooms
        connection: ops
        event: [room_created, room_created]
        room: Factor
        handler: "mod:fn"
        log: true
      - name: hook
        connection: ops
        event: room_message
        room: Factor
        backfill: 5000
        webhook: {url: "https://ci.example", secret: inline}
      - name: this-name-is-far-too-long-once-it-is-prefixed-and-suffixed
        connection: ops
        event: [room_enter]
        room: Factor
        log: true
      - name: {a: 1}
        connection: ops
        event: room_created
        log: true
    """


def test_a_bad_file_reports_every_problem_with_its_line_and_changes_nothing(
    rt: Runtime, tmp_path: Path, closed_url: str
) -> None:
    apply(rt, recipes_file(tmp_path, closed_url))
    before = database_rows(rt)
    write(tmp_path, "hipchat: {default: {api_key: x}}\n", "creds.yml")
    path = write(tmp_path, BAD_FILE)

    with pytest.raises(ValidationError) as caught:
        apply(rt, path)

    p = str(path)
    assert caught.value.errors == [
        f"{p}:4: connection ops: bad base_url, expected http(s)://host[/path]",
        f"{p}:5: connection ops: environment variable MISSING_TOKEN is not set",
        f"{p}:6: connection ops: unknown key 'token'; tokens do not belong in the recipes file:"
        " use token_env or credentials",
        f"{p}:9: connection lab: no key 'nope' under hipchat in {tmp_path / 'creds.yml'}"
        " (keys there: default)",
        f"{p}:10: the file: unknown key 'surprise'; expected one of credentials, connections,"
        " subscriptions",
        f"{p}:14: subscription ping: unknown event 'room_mesage'; expected one of room_archived,"
        " room_created, room_deleted, room_enter, room_exit, room_file_upload, room_message,"
        " room_notification, room_topic_change, room_unarchived",
        f"{p}:17: duplicate subscription name 'ping' (first at line 12)",
        f"{p}:18: subscription ping: connection 'elsewhere' is not defined in this file",
        f"{p}:21: subscription ping: invalid filter 'ping (': missing ): ping (",
        f"{p}:22: subscription ping: message template: template error at position 13:"
        " unexpected '[' in a field; use .key, [index] or [key]",
        f"{p}:23: subscription rooms: give exactly one of action, webhook, log, handler",
        f"{p}:25: subscription rooms: event 'room_created' is listed twice",
        f"{p}:26: subscription rooms: room_created watches the room list and takes no room",
        f"{p}:33: subscription hook: backfill must be within 0..1000",
        f"{p}:34: subscription hook: webhook: unknown key 'secret'; secrets do not belong in the"
        " recipes file: use secret_env",
        f"{p}:35: subscription this-name-is-far-too-long-once-it-is-prefixed-and-suffixed: the"
        " stored name 'recipe:this-name-is-far-too-long-once-it-is-prefixed-and-suffixed:"
        "room_enter' is longer than 64 characters; shorten the name",
        f"{p}:40: subscription #6: name must be text or a whole number, not a mapping",
    ]
    assert database_rows(rt) == before
    assert "do-not-put-it-here" not in " ".join(caught.value.errors)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "1: the file is empty"),
        ("- a\n- b\n", "1: the file must be a mapping, not a list"),
        ("connections:\n  ops: {base_url: 'http://h'\n", "3: invalid YAML: expected ',' or '}'"),
        ("connections: {}\nconnections: {}\n", "2: the file: duplicate key 'connections'"),
        ("subscriptions: {a: 1}\n", "1: subscriptions must be a list, not a mapping"),
        ("connections: {ops: {base_url: 'http://h'}}\n", "1: connection ops: give exactly one"),
        ("connections: {ops: {token_env: X}}\n", "1: connection ops: base_url is required"),
        (
            "connections: {ops: {base_url: 'http://h', token_env: 'A B'}}\n",
            "1: connection ops: token_env must name an environment variable",
        ),
        (
            "connections: {ops: {base_url: [1], token_env: HIPCHAT_OPS_TOKEN}}\n",
            "1: connection ops: base_url must be text, not a list",
        ),
        (
            "connections: {ops: {base_url: 'http://h', credentials: ops}}\n",
            "1: connection ops: credentials needs `credentials: FILE` at the top",
        ),
        (
            "connections: {}\nsubscriptions:\n  - {connection: x, event: room_created, log: 1}\n",
            "3: subscription #1: name is required",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_created, log: false}\n",
            "3: subscription a: log: the only value is true",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, log: true}\n",
            "3: subscription a: room_message needs a room (name or id)",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, room: r,\n"
            "     action: {action: send_notification, message: m, colour: red}}\n",
            "4: subscription a: action: unknown key 'colour'",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, room: r,\n"
            "     action: {action: send_notification, message: m, color: blue}}\n",
            "4: subscription a: color must be one of",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, room: r,\n"
            "     webhook: {url: 'https://x', secret_env: NOT_SET_Y}}\n",
            "4: subscription a: webhook: environment variable NOT_SET_Y is not set",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, room: r,\n"
            "     backfill: true, handler: 'mod:fn'}\n",
            "4: subscription a: backfill must be a whole number, not true/false",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_message, room: r,\n"
            "     include_own: 'yes', log: true}\n",
            "4: subscription a: include_own must be true or false, not",
        ),
        (
            "connections: {ops: {base_url: 'http://h', token_env: HIPCHAT_OPS_TOKEN}}\n"
            "subscriptions:\n  - {name: a, connection: ops, event: room_created,\n"
            "     include_own: true, log: true}\n",
            "3: subscription a: include_own applies only to room history events",
        ),
    ],
)
def test_single_problems(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValidationError) as caught:
        load_recipes(path)
    assert any(e.startswith(f"{path}:{error}") for e in caught.value.errors), caught.value.errors


def test_unreadable_recipes_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        load_recipes(tmp_path / "missing.yml")
    assert caught.value.errors == [
        f"{tmp_path / 'missing.yml'}: cannot read the file: No such file or directory"
    ]


# -- credentials files ------------------------------------------------------------------------
CRED_RECIPES = """
    credentials: {file}
    connections:
      ops:
        base_url: http://hipchat.example
        credentials: {key}
    """


@pytest.mark.parametrize(
    ("credentials", "key", "token"),
    [
        (f"hipchat:\n  api_key: {DEFAULT_TOKEN}\n", "default", DEFAULT_TOKEN),
        (f"hipchat:\n  ops:\n    api_key: {LAB_TOKEN}\n", "ops", LAB_TOKEN),
        (
            f"github: {{token: x}}\nhipchat:\n  api_key: {DEFAULT_TOKEN}\n"
            f"  lab: {{api_key: '{LAB_TOKEN}'}}\n",
            "lab",
            LAB_TOKEN,
        ),
    ],
    ids=["factor-single-form", "named", "mixed-with-other-tools"],
)
def test_credentials_file_forms(tmp_path: Path, credentials: str, key: str, token: str) -> None:
    write(tmp_path, credentials, "credentials.yml")
    path = write(tmp_path, CRED_RECIPES.format(file="credentials.yml", key=key))

    loaded = load_recipes(path)

    assert loaded.connections["ops"].token == token
    assert token not in repr(loaded)


def test_credentials_path_is_relative_to_the_recipes_file(
    rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf" / "secret").mkdir(parents=True)
    write(tmp_path / "conf" / "secret", f"hipchat: {{api_key: {DEFAULT_TOKEN}}}\n", "c.yml")
    path = write(tmp_path / "conf", CRED_RECIPES.format(file="secret/c.yml", key="default"))
    monkeypatch.chdir(tmp_path)

    assert apply(rt, Path("conf") / "recipes.yml") == ["+ connection ops"]
    assert connections(rt)["ops"][1] == DEFAULT_TOKEN
    assert path.exists()


@pytest.mark.parametrize(
    ("credentials", "errors"),
    [
        (None, ["{cred}: cannot read the file: No such file or directory"]),
        ("", ["{cred}:1: the credentials file is empty"]),
        ("github: {token: x}\n", ["{cred}:1: the credentials file has no hipchat section"]),
        (
            f"hipchat:\n  api_key: {DEFAULT_TOKEN}\n  api_key: {LAB_TOKEN}\n",
            ["{cred}:3: hipchat: duplicate key 'api_key' (first at line 2)"],
        ),
        (f"hipchat:\n  ops: {DEFAULT_TOKEN}\n", ["{cred}:2: hipchat: ops must be a mapping"]),
        ("hipchat:\n  ops: {}\n", ["{cred}:2: hipchat: ops: api_key is required"]),
        # A syntax error on the line holding a token: PyYAML would quote it; we do not.
        (f'hipchat:\n  api_key: "{DEFAULT_TOKEN}\n', ["{cred}:3: invalid YAML:"]),
    ],
    ids=["missing", "empty", "no-hipchat", "duplicate", "not-mapping", "no-api-key", "syntax"],
)
def test_credentials_file_problems(
    tmp_path: Path, credentials: str | None, errors: list[str]
) -> None:
    cred = tmp_path / "credentials.yml"
    if credentials is not None:
        cred.write_text(credentials, encoding="utf-8")
    path = write(tmp_path, CRED_RECIPES.format(file="credentials.yml", key="ops"))

    with pytest.raises(ValidationError) as caught:
        load_recipes(path)

    expected = [e.format(cred=cred) for e in errors]
    expected.append(f"{path}:1: the credentials file {cred} could not be used")
    assert len(caught.value.errors) == len(expected)
    for got, want in zip(caught.value.errors, expected, strict=True):
        assert got.startswith(want)
    assert DEFAULT_TOKEN not in str(caught.value.errors)
    assert LAB_TOKEN not in str(caught.value.errors)


def test_a_missing_credentials_key_lists_the_keys_there(tmp_path: Path) -> None:
    write(tmp_path, f"hipchat: {{a: {{api_key: '{LAB_TOKEN}'}}, b: {{api_key: x}}}}\n", "c.yml")
    path = write(tmp_path, CRED_RECIPES.format(file="c.yml", key="ops"))
    with pytest.raises(ValidationError) as caught:
        load_recipes(path)
    assert caught.value.errors == [
        f"{path}:5: connection ops: no key 'ops' under hipchat in {tmp_path / 'c.yml'}"
        " (keys there: a, b)"
    ]


# -- secrets ----------------------------------------------------------------------------------
def test_tokens_and_secrets_never_appear_in_output_errors_or_logs(
    rt: Runtime,
    tmp_path: Path,
    closed_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    write(tmp_path, f"hipchat: {{lab: {{api_key: '{LAB_TOKEN}'}}}}\n", "credentials.yml")
    lab = "  lab: {base_url: 'http://lab.example', credentials: lab}"
    text = recipes_file(tmp_path, closed_url).read_text()
    text = "credentials: credentials.yml\n" + text.replace(
        "subscriptions:", lab + "\nsubscriptions:"
    )
    path = write(tmp_path, text)
    seen: list[str] = []

    seen += apply(rt, path, dry_run=True)
    seen += apply(rt, path)
    monkeypatch.setenv("HIPCHAT_OPS_TOKEN", NEW_OPS_TOKEN)
    monkeypatch.setenv("HOOK_SECRET", OPS_TOKEN)
    seen += apply(rt, path)
    monkeypatch.setenv("HIPCHAT_OPS_TOKEN", NEW_OPS_TOKEN + " with spaces")
    with pytest.raises(ValidationError) as caught:
        apply(rt, path)
    seen += [str(caught.value), *caught.value.errors, repr(caught.value)]
    seen += [repr(load_recipes(path, {"HIPCHAT_OPS_TOKEN": OPS_TOKEN, "HOOK_SECRET": "h"}))]
    seen += [caplog.text, *capsys.readouterr()]

    assert "~ connection ops (token)" in seen
    assert any("the token in $HIPCHAT_OPS_TOKEN must be 1..256" in line for line in seen)
    everything = "\n".join(seen)
    for secret in SECRETS:
        assert secret not in everything


def test_snapshots_hide_secrets_in_repr() -> None:
    conn = StoredConnection(1, "ops", "http://h", OPS_TOKEN)
    sub = StoredSubscription(
        1, "ops", "recipe:a", "room_created", None, None, None, "webhook", {}, 0, HOOK_SECRET
    )
    assert OPS_TOKEN not in repr(conn)
    assert HOOK_SECRET not in repr(sub)


# -- the pure diff ----------------------------------------------------------------------------
def test_a_stored_name_on_two_connections_keeps_the_one_on_the_wanted_connection(
    tmp_path: Path, closed_url: str
) -> None:
    recipes_ = load_recipes(recipes_file(tmp_path, closed_url))
    wanted = {r.stored_name: r for r in recipes_.subscriptions}["recipe:rooms:room_created"]

    def row(sub_id: int, connection: str) -> StoredSubscription:
        return StoredSubscription(
            sub_id, connection, "recipe:rooms:room_created", "room_created",
            None, None, None, "log", {}, 0,
        )  # fmt: skip

    result = plan(recipes_, [], [row(1, "lab"), row(2, "ops")])
    removed = [c.stored.id for c in result.subscriptions if c.recipe is None and c.stored]
    assert removed == [1]
    assert changed_fields(row(2, "ops"), wanted) == ()
    assert changed_fields(row(1, "lab"), wanted) == ("connection",)


# -- the shipped example ---------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_example_files_are_valid_and_the_docs_show_them(tmp_path: Path) -> None:
    (tmp_path / "recipes.yml").write_text((EXAMPLES / "recipes.yml").read_text())
    (tmp_path / "credentials.yml").write_text((EXAMPLES / "credentials.example.yml").read_text())

    loaded = load_recipes(tmp_path / "recipes.yml", {"HIPCHAT_OPS_TOKEN": "t", "HOOK_SECRET": "s"})

    assert sorted(loaded.connections) == ["lab", "ops"]
    assert len(loaded.subscriptions) == 8
    docs = (EXAMPLES.parent / "docs" / "recipes.md").read_text()
    assert (EXAMPLES / "recipes.yml").read_text() in docs


# -- command line -----------------------------------------------------------------------------
def test_cli_apply_prints_the_changes_then_no_changes(
    tmp_path: Path,
    closed_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    key_prefix: str,
) -> None:
    monkeypatch.setenv("HIPCHAT_POLLER_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("HIPCHAT_POLLER_SECRET_KEY", generate_key())
    monkeypatch.setenv("HIPCHAT_POLLER_REDIS_KEY_PREFIX", key_prefix)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    path = str(recipes_file(tmp_path, closed_url))

    def run(*argv: str) -> str:
        args = parser.parse_args(["apply", path, *argv])
        assert args.handler is cli_recipes.cmd_apply
        assert args.handler(args) == 0
        return capsys.readouterr().out

    assert run("--dry-run").splitlines()[-1] == "dry run: nothing was changed"
    assert run().splitlines()[0] == "+ connection ops"
    assert run() == "no changes\n"
    assert run("--prune-connections") == "no changes\n"
