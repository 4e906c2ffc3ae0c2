"""The shape of every event payload (:mod:`tasks.events` builds them), written down once.

Two uses: a template field is checked against its event's shape when the subscription is
made (:func:`field_problem`: ``{item.nope}``, ``{item.mesage.message}`` or
``{item.message.message}`` on ``room_enter`` can never render, so they are refused then, not
dead-lettered on every event later); and the tests check that the payloads
:mod:`tasks.events` builds from real HipChat answers conform (:func:`conformance`).

Shapes, from HipChat's history items and webhook bodies (``docs/events.md``)::

    envelope   event, item, connection{id,name}, subscription{id,name}, matches[str],
               message, idempotency_key
    message    a history item: id, date, type, message, mentions[user], from (a user, or a
               string for notifications), file?, color?, message_format?, card?, attach_to?,
               notification_sender?, message_links?
    item       per event: see ITEMS

An object lists its keys (``?``: may be missing); a ``Map`` allows any key (``links``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.vocabulary import Event


@dataclass(frozen=True)
class Scalar:
    name: str  # "a string", "a number", ...
    types: tuple[type, ...]


@dataclass(frozen=True)
class Obj:
    fields: dict[str, Shape]
    optional: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Map:
    """An object whose keys are not fixed (``links``); every value has ``value``'s shape."""

    value: Shape


@dataclass(frozen=True)
class ListOf:
    item: Shape


@dataclass(frozen=True)
class OneOf:
    """Any of these shapes (``from``: a user object, or a string, or null)."""

    shapes: tuple[Shape, ...]


Shape = Scalar | Obj | Map | ListOf | OneOf

STR = Scalar("a string", (str,))
INT = Scalar("a number", (int,))
BOOL = Scalar("a boolean", (bool,))
NULL = Scalar("null", (type(None),))
JSON = Scalar("any JSON value", (str, int, float, bool, type(None), dict, list))


def obj(optional: Sequence[str] = (), **fields: Shape) -> Obj:
    return Obj(dict(fields), frozenset(optional))


def maybe(*shapes: Shape) -> OneOf:
    return OneOf((*shapes, NULL))


LINKS = Map(STR)
USER = obj(["links", "version"], id=INT, name=STR, mention_name=STR, version=STR, links=LINKS)
SENDER = maybe(USER, obj(name=STR))  # a user; for a string `from`, {"name": label}
FILE = obj(["thumb_url"], name=STR, size=INT, url=STR, thumb_url=STR)


def history_item(sender: Shape, optional: Sequence[str] = (), **extra: Shape) -> Obj:
    """A history item as HipChat sends it (reference §4.5); ``from`` is ``sender``."""
    fields: dict[str, Shape] = {
        "id": STR, "date": STR, "type": STR, "message": STR, "mentions": ListOf(USER),
        "from": sender, "message_links": ListOf(Map(JSON)),
    }  # fmt: skip
    return Obj(fields | extra, frozenset(["message_links", *optional]))


USER_MESSAGE = history_item(maybe(USER, STR))
FILE_MESSAGE = history_item(maybe(USER, STR), file=FILE)
NOTIFICATION = history_item(
    maybe(STR),
    ["card", "attach_to", "notification_sender"],
    color=STR,
    message_format=STR,
    card=STR,
    attach_to=STR,
    notification_sender=Map(JSON),
)
ROOM = obj(
    ["privacy", "is_archived", "version", "topic"],
    id=INT,
    name=STR,
    links=LINKS,
    privacy=STR,
    is_archived=BOOL,
    version=STR,
    topic=maybe(STR),
)
DELETED_ROOM = obj(
    ["links"], id=INT, name=STR, privacy=STR, is_archived=BOOL, topic=maybe(STR), links=LINKS
)

ITEMS: dict[str, Obj] = {
    Event.ROOM_MESSAGE: obj(message=USER_MESSAGE, room=ROOM),
    Event.ROOM_NOTIFICATION: obj(message=NOTIFICATION, room=ROOM),
    Event.ROOM_FILE_UPLOAD: obj(message=FILE_MESSAGE, room=ROOM, file=FILE, sender=SENDER),
    Event.ROOM_TOPIC_CHANGE: obj(room=ROOM, sender=SENDER, topic=STR),
    Event.ROOM_ENTER: obj(room=ROOM, sender=USER),
    Event.ROOM_EXIT: obj(room=ROOM, sender=USER),
    Event.ROOM_CREATED: obj(room=ROOM),
    Event.ROOM_ARCHIVED: obj(room=ROOM),
    Event.ROOM_UNARCHIVED: obj(room=ROOM),
    Event.ROOM_DELETED: obj(room=DELETED_ROOM),
}


def payload_shape(event: str) -> Obj:
    """The whole payload of ``event``; every event shares the envelope."""
    return obj(
        event=STR,
        item=ITEMS[event],
        connection=obj(id=INT, name=maybe(STR)),
        subscription=obj(id=INT, name=maybe(STR)),
        matches=ListOf(STR),
        message=STR,
        idempotency_key=STR,
    )


# -- templates ----------------------------------------------------------------------------------


def field_problem(event: str, steps: Sequence[tuple[str, bool]]) -> str | None:
    """Why the field ``steps`` (``(key, bracketed)`` each) can never be found in a payload of
    ``event``, or None when some payload of it may have it."""
    where = "the event"
    shapes: list[Shape] = [payload_shape(event)]
    for key, bracketed in steps:
        found = [s for shape in shapes for s in _step(shape, key, bracketed)]
        if not found:
            return _miss(where, shapes, key, bracketed)
        shapes = found
        where = key if where == "the event" else f"{where}{f'[{key}]' if bracketed else f'.{key}'}"
    return None


def _step(shape: Shape, key: str, bracketed: bool) -> list[Shape]:
    if isinstance(shape, OneOf):
        return [s for inner in shape.shapes for s in _step(inner, key, bracketed)]
    if isinstance(shape, Obj):
        return [shape.fields[key]] if key in shape.fields else []
    if isinstance(shape, Map):
        return [shape.value]
    if isinstance(shape, ListOf):
        return [shape.item] if bracketed and key.isdigit() else []
    return [JSON] if shape is JSON else []


def _miss(where: str, shapes: list[Shape], key: str, bracketed: bool) -> str:
    keys = sorted({k for s in _flat(shapes) if isinstance(s, Obj) for k in s.fields})
    if keys:
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it has {', '.join(keys)}"
        return f"{where} has no {key!r}{hint}"
    kinds = sorted({_kind(s) for s in _flat(shapes)})
    step = f"[{key}]" if bracketed else f".{key}"
    return f"{where} is {' or '.join(kinds)}, so {step} cannot be looked up in it"


def _flat(shapes: list[Shape]) -> list[Shape]:
    return [
        s
        for shape in shapes
        for s in (_flat(list(shape.shapes)) if isinstance(shape, OneOf) else [shape])
    ]


def _kind(shape: Shape) -> str:
    if isinstance(shape, Scalar):
        return shape.name
    return "a list (use [0], [1], ...)" if isinstance(shape, ListOf) else "an object"


# -- conformance (tests) ------------------------------------------------------------------------


def conformance(value: Any, shape: Shape, where: str = "payload") -> list[str]:
    """Where ``value`` departs from ``shape``: unknown or missing keys, wrong types."""
    if isinstance(shape, OneOf):
        tries = [conformance(value, s, where) for s in shape.shapes]
        return [] if any(not t for t in tries) else min(tries, key=len)
    if isinstance(shape, Scalar):
        exact = type(value) in shape.types or (shape is JSON)
        return [] if exact else [f"{where} is {type(value).__name__}, not {shape.name}"]
    if isinstance(shape, ListOf):
        if type(value) is not list:
            return [f"{where} is not a list"]
        return [p for i, v in enumerate(value) for p in conformance(v, shape.item, f"{where}[{i}]")]
    if type(value) is not dict:
        return [f"{where} is not an object"]
    if isinstance(shape, Map):
        return [p for k, v in value.items() for p in conformance(v, shape.value, f"{where}.{k}")]
    problems = [f"{where}.{k} is not in the schema" for k in value if k not in shape.fields]
    problems += [
        f"{where}.{k} is missing"
        for k in shape.fields
        if k not in value and k not in shape.optional
    ]
    for k, v in value.items():
        if k in shape.fields:
            problems += conformance(v, shape.fields[k], f"{where}.{k}")
    return problems
