"""Managing connections and subscriptions from the command line: tokens checked with HipChat
before they are stored, ``connection set-token`` and ``connection test``, ``subscription
update`` (in place: the watermark and priming stay), ``subscription pause`` and ``resume``."""

from __future__ import annotations

import io
import sys
from datetime import UTC, datetime

import pytest

from emulator import EmulatorServer
from storage import connections as conns
from storage import outbox, watermarks
from storage import subscriptions as subs
from storage.outbox import NewEvent
from tests.cli_support import TOKEN, Cli, runtime

OTHER = "tok-other-9c41e7"  # a second valid token, as distinctive as TOKEN
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def connections() -> list[tuple[str, str, str]]:
    rt = runtime()
    with rt.db.session() as s:
        return [
            (c.name, c.state, conns.decrypt_token(c, rt.cipher)) for c in conns.list_connections(s)
        ]


# -- connection add checks the token ------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "base", "code", "error"),
    [
        ("not-a-token", "", 2, "error: HipChat refused the token (401): it is invalid, expired "
         "or revoked; nothing stored (--no-check stores it unchecked)"),
        ("weak", "", 2, "error: the token is valid but lacks a scope: GET /v2/room: HTTP 403: "
         "This action requires one of the following scopes: [u'view_group', u'view_room']; "
         "nothing stored (--no-check stores it unchecked)"),
        (TOKEN, "/not-hipchat", 2, "error: {url}/not-hipchat does not look like a HipChat API: "
         "GET /not-hipchat/v2/room: HTTP 404: Resource not found; nothing stored (--no-check "
         "stores it unchecked)"),
    ],
)  # fmt: skip
def test_connection_add_refuses_a_token_hipchat_refuses(
    cli: Cli, server: EmulatorServer, token: str, base: str, code: int, error: str
) -> None:
    server.state.create_token(2, ["send_message"], token="weak")
    url = server.base_url
    assert cli("connection", "add", "ops", "--base-url", url + base, "--token", token) == (
        code,
        "",
        error.format(url=url) + "\n",
    )
    assert connections() == []


def test_connection_add_with_hipchat_unreachable_exits_1_and_stores_nothing(cli: Cli) -> None:
    code, _, err = cli(
        "connection", "add", "ops", "--base-url", "http://127.0.0.1:9", "--token", TOKEN
    )
    assert code == 1
    assert err.startswith("error: cannot check the token now (GET /v2/room: connection failed")
    assert connections() == []


def test_connection_add_no_check_stores_without_asking(cli: Cli, server: EmulatorServer) -> None:
    code, out, _ = cli(
        "connection", "add", "ops", "--base-url", server.base_url, "--token", "x", "--no-check"
    )
    assert (code, out) == (0, f"connection ops added (id 1, {server.base_url})\n")
    assert server.state.calls() == []
    assert connections() == [("ops", "active", "x")]


# -- set-token and test -------------------------------------------------------------------------


def test_set_token_replaces_it_after_checking(
    cli: Cli, ops: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ops.state.create_token(1, token=OTHER)
    monkeypatch.setattr(sys, "stdin", io.StringIO(OTHER + "\n"))
    assert cli("connection", "set-token", "ops", "--token-stdin") == (
        0,
        "connection ops: token replaced (active); token checked with HipChat\n",
        "",
    )
    assert connections() == [("ops", "active", OTHER)]

    monkeypatch.setenv("NEW_TOKEN", "revoked-long-ago")
    code, out, err = cli("connection", "set-token", "ops", "--token-env", "NEW_TOKEN")
    assert (code, out) == (2, "")
    assert err.startswith("error: HipChat refused the token (401)")
    assert connections() == [("ops", "active", OTHER)]  # unchanged
    assert "revoked-long-ago" not in err


def test_a_new_token_reactivates_an_auth_failed_connection(cli: Cli, ops: EmulatorServer) -> None:
    with runtime().db.session() as s:
        conns.set_connection_state(s, 1, "auth_failed", "HTTP 401")
    monkeypatched = ("connection", "set-token", "ops", "--token", TOKEN)
    assert cli(*monkeypatched)[0] == 0
    assert connections() == [("ops", "active", TOKEN)]


def test_set_token_of_an_unknown_connection_exits_2(cli: Cli) -> None:
    assert cli("connection", "set-token", "nope", "--token", TOKEN) == (
        2,
        "",
        "error: no connection named 'nope'\n",
    )


def test_connection_test_says_what_the_token_can_do(cli: Cli, ops: EmulatorServer) -> None:
    assert cli("connection", "test", "ops") == (
        0,
        "connection ops: the token is valid (HipChat accepted it for GET /v2/room, scope "
        "view_group)\n",
        "",
    )
    ops.state.revoke_token(TOKEN)
    assert cli("connection", "test", "ops") == (
        1,
        "",
        "error: connection ops: HipChat refused the token (401): it is invalid, expired or "
        "revoked; replace it: hipchat-poller connection set-token ops\n",
    )
    ops.state.create_token(1, ["send_message"], token=TOKEN)
    code, _, err = cli("connection", "test", "ops")
    assert code == 1
    assert err.startswith("error: connection ops: the token is valid but lacks a scope: ")
    assert cli("connection", "test", "nope") == (2, "", "error: no connection named 'nope'\n")


# -- subscription update --------------------------------------------------------------------------


@pytest.fixture
def ping(cli: Cli, ops: EmulatorServer) -> int:
    """Subscription 1: Factor's ping/pong as a green notification, primed, with a watermark;
    subscription 2: a signed webhook."""
    for argv in (
        ["--event", "room_message", "--room", "Factor", "--filter", "^ping (.*)",
         "--notify", "pong {matches[0]}", "--color", "green", "--name", "ping-pong"],
        ["--event", "room_file_upload", "--room", "Factor", "--webhook", "https://ci.example/h",
         "--secret", "hook-secret-123", "--name", "files"],
    ):  # fmt: skip
        code, _, err = cli("subscribe", "ops", *argv)
        assert code == 0, err
    room = int(ops.state.get_room("Factor")["id"])
    with runtime().db.session() as s:
        subs.mark_primed(s, [1, 2], T0)
        watermarks.advance_watermark(s, 1, room, "history", "m-42", T0)
    return room


def _row(sub_id: int) -> subs.Subscription:
    with runtime().db.session() as s:
        row = subs.get_subscription(s, sub_id)
        assert row is not None
        return row


def _place(room: int) -> tuple[object, object]:
    """Where subscription 1 has got to: its room's watermark, its priming."""
    with runtime().db.session() as s:
        mark = watermarks.get_watermark(s, 1, room, "history")
    return (mark.last_id if mark else None), _row(1).primed_at


def test_update_changes_the_target_in_place(cli: Cli, ping: int) -> None:
    assert cli(
        "subscription", "update", "1", "--template", "PONG {matches[0]}", "--color", "red",
        "--to-room", "General", "--alert",
    ) == (
        0,
        "subscription 1 updated: room_message Factor -> notify 'PONG {matches[0]}' red alert in "
        "General (its place is kept)\n",
        "",
    )  # fmt: skip
    row = _row(1)
    assert (row.filter, row.name, row.target_kind) == ("^ping (.*)", "ping-pong", "action")
    assert row.target == {
        "action": "send_notification", "message": "PONG {matches[0]}", "color": "red",
        "format": "html", "notify": True, "room": "General",
    }  # fmt: skip
    assert _place(ping) == ("m-42", T0)


def test_update_to_a_new_target_and_filter(cli: Cli, ping: int) -> None:
    code, _, err = cli(
        "subscription", "update", "1", "--filter", "^deploy (\\w+) (\\w+)", "--reply",
        "deploying {matches[1]}", "--name", "deploys",
    )  # fmt: skip
    assert code == 0, err
    row = _row(1)
    assert (row.filter, row.name) == ("^deploy (\\w+) (\\w+)", "deploys")
    assert row.target == {"action": "post_message", "message": "deploying {matches[1]}"}
    assert cli("subscription", "update", "1", "--no-filter", "--log")[0] == 0
    assert (_row(1).filter, _row(1).target_kind, _row(1).target) == (None, "log", {})
    assert _place(ping) == ("m-42", T0)


def test_update_keeps_replaces_or_drops_a_webhook_secret(cli: Cli, ping: int) -> None:
    rt = runtime()
    assert cli("subscription", "update", "2", "--webhook", "https://ci.example/new")[0] == 0
    target = _row(2).target
    assert target["url"] == "https://ci.example/new"
    assert rt.cipher.decrypt(target["secret_encrypted"]) == "hook-secret-123"
    assert cli("subscription", "update", "2", "--secret", "rotated-456")[0] == 0
    assert rt.cipher.decrypt(_row(2).target["secret_encrypted"]) == "rotated-456"
    assert "rotated-456" not in str(_row(2).target)
    assert cli("subscription", "update", "2", "--no-secret")[0] == 0
    assert _row(2).target == {"url": "https://ci.example/new"}


@pytest.mark.parametrize(
    ("argv", "errors"),
    [
        (["--filter", "^ping"], ["message template: field {matches[0]} at position 5: the filter "
                                 "has no groups (or no filter), so matches[0] never exists"]),
        (["--template", "{item.mesage}"], ["message template: field {item.mesage} at position "
                                           "0: in a room_message event, item has no 'mesage'; "
                                           "did you mean 'message'?"]),
        (["--secret", "s"], ["--secret goes with --webhook"]),
        (["--no-secret"], ["--no-secret goes with --webhook"]),
        (["--log", "--color", "red"], ["--color goes with --notify"]),
        (["--webhook", "https://x/h", "--template", "t"],
         ["--template changes the message of a --reply or --notify target"]),
        (["--to-room", "Nowhere"], ["room 'Nowhere' not found on this connection"]),
        (["--handler", "nosuchmod:fn"],
         ["handler 'nosuchmod:fn': cannot import 'nosuchmod' (ModuleNotFoundError: No module "
          "named 'nosuchmod'); is it on PYTHONPATH?"]),
        (["--name", "files"], ["this connection already has a subscription named 'files'"]),
    ],
)  # fmt: skip
def test_a_bad_update_changes_nothing(
    cli: Cli, ping: int, argv: list[str], errors: list[str]
) -> None:
    before = _row(1)
    code, out, err = cli("subscription", "update", "1", *argv)
    assert (code, out, err.splitlines()) == (2, "", [f"error: {e}" for e in errors])
    after = _row(1)
    assert (after.filter, after.name, after.target) == (before.filter, before.name, before.target)


def test_include_own_is_set_kept_and_cleared(cli: Cli, ping: int) -> None:
    assert _row(1).include_own is False
    assert cli("subscription", "update", "1", "--include-own")[0] == 0
    assert _row(1).include_own is True
    assert cli("subscription", "update", "1", "--color", "red")[0] == 0  # other changes keep it
    assert _row(1).include_own is True
    assert cli.json("subscriptions", "--json")[0]["include_own"] is True
    assert cli("subscription", "update", "1", "--no-include-own")[0] == 0
    assert _row(1).include_own is False
    assert _place(ping) == ("m-42", T0)
    code, out, err = cli(
        "subscribe", "ops", "--event", "room_notification", "--room", "Factor", "--log",
        "--include-own",
    )  # fmt: skip
    assert code == 0, err
    assert _row(3).include_own is True
    code, out, err = cli("subscribe", "ops", "--event", "room_created", "--log", "--include-own")
    assert (code, out) == (2, "")
    assert "include_own applies only to room history events" in err


def test_update_of_an_unknown_subscription_exits_2(cli: Cli, ops: EmulatorServer) -> None:
    assert cli("subscription", "update", "9", "--log") == (2, "", "error: no subscription 9\n")


# -- pause and resume -----------------------------------------------------------------------------


def test_pause_and_resume(cli: Cli, ping: int) -> None:
    assert cli("subscription", "pause", "1") == (
        0,
        "subscription 1 paused: polls skip it until `subscription resume 1`\n",
        "",
    )
    assert (_row(1).state, _row(1).state_reason) == ("paused", "paused by a person")
    assert cli("subscription", "resume", "1") == (
        0,
        "subscription 1 active (was paused: paused by a person)\n",
        "",
    )
    assert (_row(1).state, _row(1).state_reason) == ("active", None)
    assert cli("subscription", "pause", "7") == (2, "", "error: no subscription 7\n")


def test_resume_clears_an_error_and_hands_waiting_events_over(cli: Cli, ping: int) -> None:
    with runtime().db.session() as s:
        subs.set_subscription_state(s, 2, "error", "webhook https://ci.example/h answered 410")
        outbox.add_events(s, [NewEvent(1, 2, "sub:2:x", "room_file_upload", {})])
    code, out, _ = cli("subscription", "resume", "2")
    assert code == 0
    assert out.splitlines() == [
        "subscription 2 active (was error: webhook https://ci.example/h answered 410)",
        "1 event(s) waiting: the relay hands them to a worker within 10 s "
        "(RELAY_INTERVAL_SECONDS) while beat (or `hipchat-poller run`) is running",
    ]
    assert _row(2).state == "active"


def test_no_management_command_shows_a_secret(cli: Cli, ping: int) -> None:
    for argv in (
        ["subscriptions"], ["subscriptions", "--json"], ["connection", "test", "ops"],
        ["subscription", "update", "2", "--webhook", "https://u:hunter2@x.example/h?k=qs-77"],
        ["subscriptions"], ["status"], ["events"],
    ):  # fmt: skip
        cli(*argv)
    output = cli.all_output()
    for secret in ("hook-secret-123", "hunter2", "qs-77", TOKEN):
        assert secret not in output, secret
