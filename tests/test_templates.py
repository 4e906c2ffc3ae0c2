"""Safe templates: lookups in the event's JSON data and nothing else."""

from __future__ import annotations

import re
from typing import Any

import pytest

from storage.errors import ValidationError
from tasks.events import message_event
from tasks.filters import compile_filter
from tasks.hipchat_types import Message
from tasks.templates import (
    MAX_RENDERED_CHARS,
    MAX_TEMPLATE_CHARS,
    TemplateError,
    compile_template,
    render,
    validate_template,
)

ROOM = {
    "id": 142882,
    "name": "Factor",
    "is_archived": False,
    "links": {"self": "https://api.hipchat.com/v2/room/142882"},
}
MESSAGE = {
    "id": "25b9dfe9-dfc9-487e-b996-2297caaca915",
    "mentions": [],
    "message": "go foo",
    "date": "2014-07-30T18:30:25.236745+00:00",
    "type": "message",
    "from": {"id": 233775, "mention_name": "Skierkowski", "name": "Maciej Skierkowski"},
}
# Factor's response example (seeds/004), as tasks.events builds it.
EVENT: dict[str, Any] = {
    "event": "room_message",
    "item": {"message": MESSAGE, "room": ROOM},
    "connection": {"id": 1, "name": "main"},
    "subscription": {"id": 7, "name": "ping"},
    "matches": ["foo", ""],
    "message": "go foo",
    "idempotency_key": "sub:7:25b9dfe9-dfc9-487e-b996-2297caaca915",
    "flags": {"null": None, "pi": 3.5, "list": [1, "two"]},
}

RENDER_CASES = [
    pytest.param("pong {matches[0]}", "pong foo", id="factor-ping-pong"),
    pytest.param("[{matches[1]}]", "[]", id="unmatched-optional-group"),
    pytest.param("{item.message.from.name}", "Maciej Skierkowski", id="sender-name"),
    pytest.param("{item.message.message}", "go foo", id="message-text"),
    pytest.param("{item.room.name}", "Factor", id="room-name"),
    pytest.param("{event}: {message}", "room_message: go foo", id="top-level"),
    pytest.param("{item[room][name]}", "Factor", id="bracket-keys"),
    pytest.param("{item.room.id}", "142882", id="number"),
    pytest.param("{item.room.is_archived}", "false", id="boolean"),
    pytest.param("{flags.null}", "null", id="null"),
    pytest.param("{flags.pi}", "3.5", id="float"),
    pytest.param("{flags.list}", '[1,"two"]', id="list-as-json"),
    pytest.param("{flags.list[1]}", "two", id="list-index"),
    pytest.param(
        "{item.room.links}", '{"self":"https://api.hipchat.com/v2/room/142882"}', id="obj"
    ),
    pytest.param("{{literal}} {{{event}}}", "{literal} {room_message}", id="brace-escapes"),
    pytest.param("}}{{", "}{", id="only-escapes"),
    pytest.param("{event}{message}", "room_messagego foo", id="adjacent-fields"),
    pytest.param("no fields at all", "no fields at all", id="no-fields"),
    pytest.param("", "", id="empty"),
    pytest.param("→ {item.room.name} ✓", "→ Factor ✓", id="unicode-literal"),
]


@pytest.mark.parametrize(("text", "expected"), RENDER_CASES)
def test_render(text: str, expected: str) -> None:
    assert render(compile_template(text), EVENT) == expected


def test_render_unicode_values() -> None:
    event = EVENT | {"message": "café ☃ 日本"}
    assert render(compile_template("«{message}»"), event) == "«café ☃ 日本»"


COMPILE_ERRORS = [
    pytest.param("pong {", 5, "not closed", id="unclosed"),
    pytest.param("pong }", 5, "single '}'", id="single-close"),
    pytest.param("a{b{c}}", 1, "not closed", id="nested"),
    pytest.param("x {}", 2, "empty field", id="empty-field"),
    pytest.param("{x!r}", 2, "conversions", id="conversion"),
    pytest.param("{x!s}", 2, "conversions", id="conversion-s"),
    pytest.param("{x:>10}", 2, "format specs", id="format-spec"),
    pytest.param("{matches[0]:>999999999}", 11, "format specs", id="huge-width"),
    pytest.param("{0}", 1, "must start with a name", id="positional"),
    pytest.param("{0.__class__}", 1, "must start with a name", id="positional-attribute"),
    pytest.param("{.x}", 1, "must start with a name", id="leading-dot"),
    pytest.param("{a..b}", 2, "unexpected '.'", id="double-dot"),
    pytest.param("{a.}", 2, "unexpected '.'", id="trailing-dot"),
    pytest.param("{a[]}", 2, "unexpected '['", id="empty-brackets"),
    pytest.param("{a[0}", 2, "unexpected '['", id="unclosed-bracket"),
    pytest.param("{a.1}", 2, "unexpected '.'", id="dot-number"),
    pytest.param("{ event }", 1, "must start with a name", id="spaces"),
    pytest.param("{event()}", 6, "unexpected '('", id="call"),
]


@pytest.mark.parametrize(("text", "position", "reason"), COMPILE_ERRORS)
def test_compile_errors_give_the_position(text: str, position: int, reason: str) -> None:
    with pytest.raises(
        ValidationError, match=f"at position {position}: .*{re.escape(reason)}"
    ) as caught:
        compile_template(text)
    assert not isinstance(caught.value, TemplateError)
    with pytest.raises(ValidationError):
        validate_template(text)


def test_template_length_is_capped() -> None:
    validate_template("x" * MAX_TEMPLATE_CHARS)
    with pytest.raises(ValidationError, match="longer than"):
        compile_template("x" * (MAX_TEMPLATE_CHARS + 1))


RENDER_ERRORS = [
    pytest.param("{nope}", "the event has no key 'nope'", id="missing-top-level"),
    pytest.param("{item.message.nope}", "item.message has no key 'nope'", id="missing-nested"),
    pytest.param("{matches[5]}", "matches has 2 items, no index 5", id="index-out-of-range"),
    pytest.param("{matches.first}", "matches is a list", id="dot-on-list"),
    pytest.param("{matches[first]}", "matches is a list", id="key-on-list"),
    pytest.param("{matches[-1]}", "matches is a list", id="negative-index"),
    pytest.param("{item[0]}", "item has no key '0'", id="index-on-object"),
    pytest.param("{message.text}", "message is a string", id="key-on-string"),
    pytest.param("{flags.null.x}", "flags.null is null", id="key-on-null"),
    pytest.param("{item.room.id[0]}", "item.room.id is a number", id="index-on-number"),
]


@pytest.mark.parametrize(("text", "reason"), RENDER_ERRORS)
def test_render_errors_name_the_field(text: str, reason: str) -> None:
    with pytest.raises(TemplateError) as caught:
        render(compile_template("ok " + text), EVENT)
    assert str(caught.value).startswith(f"template field {text} at position 3: {reason}")
    assert isinstance(caught.value, ValidationError)


def test_notification_sender_is_a_string_not_an_object() -> None:
    event = EVENT | {"item": {"message": MESSAGE | {"from": "Jenkins"}, "room": ROOM}}
    assert render(compile_template("{item.message.from}"), event) == "Jenkins"
    with pytest.raises(TemplateError, match=r"item\.message\.from is a string"):
        render(compile_template("{item.message.from.name}"), event)


def test_rendered_size_is_capped() -> None:
    event = {"big": "x" * (MAX_RENDERED_CHARS // 2 + 1)}
    assert len(render(compile_template("{big}"), event)) == MAX_RENDERED_CHARS // 2 + 1
    with pytest.raises(TemplateError, match="longer than"):
        render(compile_template("{big}{big}"), event)


# --- safety: nothing beyond the event's JSON data is reachable ------------------------------

ESCAPES = [
    pytest.param("{item.__class__}", id="class"),
    pytest.param("{item.message.__init__.__globals__}", id="globals"),
    pytest.param("{0.__class__}", id="positional-class"),
    pytest.param("{event.__class__.__mro__}", id="mro"),
    pytest.param("{matches.__len__}", id="list-method"),
    pytest.param("{item.__dict__}", id="dict"),
    pytest.param("{message.upper}", id="str-method"),
    pytest.param("{item[__class__]}", id="bracket-dunder"),
    pytest.param("{__builtins__}", id="builtins"),
    pytest.param("{item.keys}", id="dict-method"),
]


@pytest.mark.parametrize("text", ESCAPES)
def test_templates_cannot_reach_python_objects(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        render(compile_template(text), EVENT)
    assert "<" not in str(caught.value)  # no repr of a class, function or module leaked


class Tripwire:
    """An object that records any attempt to read, index, format or print it."""

    touched: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.touched.append(f"getattr {name}")
        return self

    def __getitem__(self, key: Any) -> Any:
        self.touched.append(f"getitem {key}")
        return self

    def __format__(self, spec: str) -> str:
        self.touched.append("format")
        return "LEAK"

    def __str__(self) -> str:
        self.touched.append("str")
        return "LEAK"


class SneakyDict(dict[str, Any]):
    def __getitem__(self, key: str) -> Any:
        Tripwire.touched.append(f"sneaky {key}")
        return "LEAK"


@pytest.mark.parametrize(
    "text", ["{obj}", "{obj.secret}", "{obj[0]}", "{obj[key]}", "{sneaky.x}", "{sneaky}"]
)
def test_non_json_objects_in_an_event_are_never_touched(text: str) -> None:
    Tripwire.touched.clear()
    event = {"obj": Tripwire(), "sneaky": SneakyDict(x=1)}
    with pytest.raises(TemplateError, match=r"not JSON data|cannot be looked up"):
        render(compile_template(text), event)
    assert Tripwire.touched == []


def test_factor_ping_pong_end_to_end() -> None:
    msg = Message.parse(MESSAGE | {"message": "ping foo"})
    matches = compile_filter("ping (.*)").match(msg.text)
    event = message_event(
        "room_message",
        msg,
        ROOM,
        connection={"id": 1, "name": "main"},
        subscription={"id": 7, "name": "ping"},
        matches=matches,
    )
    template = compile_template("pong {matches[0]} (from {item.message.from.name})")
    assert render(template, event) == "pong foo (from Maciej Skierkowski)"
