"""Subscription validation (tasks.subscribe) and creation (tasks.subscriptions_api): every bad
input gets a clear error, all problems at once, and nothing is stored."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emulator import EmulatorServer
from storage import subscriptions as subs
from storage.errors import ValidationError
from tasks.filters import compile_filter
from tasks.runtime import Runtime
from tasks.subscribe import SubscriptionSpec, spec_errors, validate_spec
from tasks.subscriptions_api import create_subscriptions
from tests.actions_support import add_connection, make_runtime

PONG = {"action": "post_message", "message": "pong {matches[0]}"}


def spec(**changes: Any) -> SubscriptionSpec:
    base = SubscriptionSpec(
        connection="ops",
        event="room_message",
        target_kind="action",
        target=dict(PONG),
        room="Factor",
        filter="ping (.*)",
    )
    return replace(base, **changes)


# -- valid specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good",
    [
        spec(),  # Factor's ping/pong
        spec(event="room_file_upload", filter=None, target_kind="log", target={}),
        spec(event="room_notification", filter=None, target_kind="log", target={}),
        spec(event="room_topic_change", filter=None, target_kind="log", target={}),
        spec(event="room_enter", filter=None, target_kind="handler", target={"handler": "m:f"}),
        spec(event="room_exit", room="10001", filter=None, target_kind="log", target={}),
        spec(event="room_created", room=None, filter=None, target_kind="log", target={}),
        spec(
            event="room_deleted",
            room=None,
            filter=None,
            target={"action": "post_message", "message": "{item.room.name} is gone", "room": 10001},
        ),
        spec(target_kind="webhook", target={"url": "https://ci.example/hook?x=1", "secret": "s"}),
        spec(
            target={
                "action": "send_notification",
                "message": "<b>{matches[0]}</b>",
                "color": "random",
                "format": "html",
                "notify": True,
                "from": "{item.room.name}",
            }
        ),
        spec(target={"action": "send_notification", "message": "x", "color": "grey"}),
        spec(filter="(?i)^deploy (\\w+) to (\\pL+)$", backfill=1000),
        spec(filter="(a+)+$", target={"action": "post_message", "message": "{message}"}),
    ],
    ids=lambda s: f"{s.event}-{s.target_kind}",
)
def test_valid_specs_have_no_errors(good: SubscriptionSpec) -> None:
    assert spec_errors(good) == []
    validate_spec(good)


# -- one problem each ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        (
            {"event": "room_mesage"},
            "unknown event 'room_mesage'; expected one of room_archived, room_created, "
            "room_deleted, room_enter, room_exit, room_file_upload, room_message, "
            "room_notification, room_topic_change, room_unarchived",
        ),
        ({"room": None}, "room_message needs a room (name or id)"),
        ({"room": "  "}, "room_message needs a room (name or id)"),
        ({"room": "r" * 101}, "room must be 1..100 characters"),
        (
            {"event": "room_created", "filter": None, "target_kind": "log", "target": {}},
            "room_created watches the room list and takes no room",
        ),
        (
            {"event": "room_enter", "target_kind": "log", "target": {}},
            "a filter applies only to room_message",
        ),
        ({"filter": "(a+"}, "invalid filter '(a+': missing ): (a+"),
        (
            {"filter": r"(a)\1"},
            r"invalid filter '(a)\\1': invalid escape sequence: \1; "
            "backreferences are not supported (RE2 does not backtrack)",
        ),
        (
            {"filter": "ping (?=x)"},
            "invalid filter 'ping (?=x)': invalid perl operator: (?=; "
            "lookaround is not supported (RE2 does not backtrack)",
        ),
        ({"backfill": -1}, "backfill must be within 0..1000"),
        ({"backfill": 1001}, "backfill must be within 0..1000"),
        ({"backfill": True}, "backfill must be a whole number"),
        ({"connection": ""}, "a connection name is required"),
        (
            {"target_kind": "email"},
            "unknown target 'email'; expected one of webhook, log, action, handler",
        ),
        ({"target_kind": "webhook", "target": {}}, "webhook target needs a url"),
        (
            {"target_kind": "webhook", "target": {"url": "ftp://ci.example/h"}},
            "webhook url must be http(s)://host/...",
        ),
        (
            {"target_kind": "webhook", "target": {"url": "https:///path"}},
            "webhook url must be http(s)://host/...",
        ),
        (
            {"target_kind": "webhook", "target": {"url": "ci.example/hook"}},
            "webhook url must be http(s)://host/...",
        ),
        (
            {"target_kind": "webhook", "target": {"url": "http://ci.example:99999/"}},
            "webhook url must be http(s)://host/...",
        ),
        (
            {"target_kind": "webhook", "target": {"url": "https://ci.example/a b"}},
            "webhook url must not contain spaces or control characters",
        ),
        (
            {"target_kind": "handler", "target": {"handler": "module_only"}},
            "handler target needs 'handler' as 'module:function'",
        ),
        (
            {"target": {"action": "add_member", "message": "x"}},
            "action must be one of post_message, send_notification, not 'add_member'",
        ),
        ({"target": {"action": "post_message"}}, "post_message needs a message template"),
        (
            {"target": {"action": "post_message", "message": "{item.__class__}"}},
            "message template: field {item.__class__} at position 0: '__class__' is not an "
            "event field (names starting with '_' are refused)",
        ),
        (
            {"target": {"action": "post_message", "message": "pong {matches[0]"}},
            "message template: template error at position 5: '{' is not closed "
            "(write '{{' for a literal brace)",
        ),
        (
            {"target": {"action": "post_message", "message": "pong }"}},
            "message template: template error at position 5: single '}' "
            "(write '}}' for a literal brace)",
        ),
        (
            {"target": {"action": "post_message", "message": "{matches[0]!r}"}},
            "message template: template error at position 11: conversions such as '!r' "
            "are not supported",
        ),
        (
            {"target": {"action": "post_message", "message": "hi {mesage}"}},
            "message template: field {mesage} at position 3: the event has no 'mesage'; it has "
            "event, item, connection, subscription, matches, message, idempotency_key",
        ),
        (
            {"target": {"action": "post_message", "message": "{matches[1]}"}},
            "message template: field {matches[1]} at position 0: the filter has 1 group(s), "
            "so matches[1] never exists",
        ),
        (
            {"filter": None},
            "message template: field {matches[0]} at position 5: the filter has no groups "
            "(or no filter), so matches[0] never exists",
        ),
        (
            {"target": {"action": "post_message", "message": "x" * 1001}},
            "message template: its fixed text alone is 1001 characters; the limit is 1000",
        ),
        (
            {"target": {"action": "send_notification", "message": "x", "color": "blue"}},
            "color must be one of yellow, green, red, purple, gray, random, not 'blue'",
        ),
        (
            {"target": {"action": "send_notification", "message": "x", "format": "md"}},
            "format must be text or html, not 'md'",
        ),
        (
            {"target": {"action": "send_notification", "message": "x", "notify": "yes"}},
            "notify must be true or false",
        ),
        (
            {"target": {"action": "send_notification", "message": "x", "from": "f" * 65}},
            "from template: its fixed text alone is 65 characters; the limit is 64",
        ),
        (
            {"target": {"action": "post_message", "message": "x", "room": ""}},
            "action room must be a room id or a name of 1..100 characters",
        ),
    ],
)
def test_each_bad_input_gets_a_clear_error(changes: dict[str, Any], error: str) -> None:
    assert spec_errors(spec(**changes)) == [error]


# -- all problems at once --------------------------------------------------------------------


def test_every_problem_is_listed_at_once() -> None:
    bad = SubscriptionSpec(
        connection="ops",
        event="room_created",
        room="Factor",
        filter="(a+",
        backfill=5000,
        target_kind="action",
        target={
            "action": "send_notification",
            "message": "{item.__class__} {{",
            "from": "{a",
            "color": "blue",
            "format": "md",
        },
    )

    with pytest.raises(ValidationError) as caught:
        validate_spec(bad)

    assert caught.value.errors == [
        "room_created watches the room list and takes no room",
        "backfill must be within 0..1000",
        "a filter applies only to room_message",
        "invalid filter '(a+': missing ): (a+",
        "message template: field {item.__class__} at position 0: '__class__' is not an event "
        "field (names starting with '_' are refused)",
        "from template: template error at position 0: '{' is not closed (write '{{' for a "
        "literal brace)",
        "color must be one of yellow, green, red, purple, gray, random, not 'blue'",
        "format must be text or html, not 'md'",
    ]
    assert str(caught.value).startswith("invalid subscription: room_created watches")


def test_webhook_url_errors_never_echo_the_url() -> None:
    errors = spec_errors(spec(target_kind="webhook", target={"url": "ftp://u:hunter2@x/?k=s3"}))
    assert errors == ["webhook url must be http(s)://host/..."]


# -- RE2: linear time --------------------------------------------------------------------------


def test_a_catastrophic_pattern_is_accepted_and_fast_on_a_long_input() -> None:
    assert (
        spec_errors(spec(filter="(a+)+$", target={"action": "post_message", "message": "x"})) == []
    )
    evil = compile_filter("(a+)+$")

    started = time.perf_counter()
    # A backtracking engine needs longer than the age of the universe for this one.
    assert evil.match("a" * 9_998 + "!") is None
    assert evil.match("a" * 9_998 + "!a") == ["a"]
    assert time.perf_counter() - started < 0.5  # milliseconds in fact; generous for CI


# -- creating subscriptions -------------------------------------------------------------------


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return make_runtime(tmp_path)


@pytest.fixture
def factor(rt: Runtime, emulator: EmulatorServer, emulator_token: str) -> int:
    add_connection(rt, "ops", emulator.base_url, emulator_token)
    room_id: int = emulator.state.create_room("Factor")["id"]
    return room_id


def stored(rt: Runtime) -> list[Any]:
    with rt.db.session() as s:
        return [
            (r.event, r.room, r.room_id, r.target_kind, dict(r.target))
            for r in subs.list_subscriptions(s)
        ]


def test_create_resolves_the_room_and_encrypts_a_webhook_secret(rt: Runtime, factor: int) -> None:
    hook = spec(target_kind="webhook", target={"url": "https://ci.example/h", "secret": "s3cr3t"})
    [pong, webhook] = create_subscriptions(rt, [spec(), hook])

    assert (pong.room, pong.room_id, pong.target) == ("Factor", factor, PONG)
    assert "secret" not in webhook.target
    assert rt.cipher.decrypt(webhook.target["secret_encrypted"]) == "s3cr3t"


def test_create_refuses_an_unknown_room_and_stores_nothing(
    rt: Runtime, factor: int, emulator: EmulatorServer
) -> None:
    with pytest.raises(ValidationError) as caught:
        create_subscriptions(
            rt,
            [
                spec(),
                spec(room="Nowhere"),
                spec(
                    room="Elsewhere", event="room_enter", filter=None, target_kind="log", target={}
                ),
            ],
        )

    assert caught.value.errors == [
        "room 'Nowhere' not found on this connection",
        "room 'Elsewhere' not found on this connection",
    ]
    assert stored(rt) == []


def test_create_lists_every_bad_spec_before_any_call(
    rt: Runtime, factor: int, emulator: EmulatorServer
) -> None:
    calls = len(emulator.state.call_log.select())
    with pytest.raises(ValidationError) as caught:
        create_subscriptions(
            rt,
            [
                spec(filter=r"(a)\1"),
                spec(name="bad name!"),
                spec(name="twice"),
                spec(name="twice"),
            ],
        )

    assert caught.value.errors == [
        r"invalid filter '(a)\\1': invalid escape sequence: \1; backreferences are not "
        "supported (RE2 does not backtrack)",
        "bad subscription name 'bad name!': use 1 to 255 of A-Z a-z 0-9 _ . : -",
        "the name 'twice' is given twice",
    ]
    assert len(emulator.state.call_log.select()) == calls
    assert stored(rt) == []


def test_create_refuses_an_unknown_connection(rt: Runtime, factor: int) -> None:
    with pytest.raises(ValidationError) as caught:
        create_subscriptions(rt, [spec(connection="nope"), spec(connection="other")])
    assert caught.value.errors == ["no connection named 'nope'", "no connection named 'other'"]


def test_room_list_events_need_no_lookup(
    rt: Runtime, factor: int, emulator: EmulatorServer
) -> None:
    calls = len(emulator.state.call_log.select())
    [view] = create_subscriptions(
        rt, [spec(event="room_created", room=None, filter=None, target_kind="log", target={})]
    )
    assert (view.room, view.room_id) == (None, None)
    assert len(emulator.state.call_log.select()) == calls
