"""Event payloads (what downstream actions receive) and their idempotency keys.

A payload mirrors HipChat's webhook body (reference §6) plus Factor's conveniences::

    {"event": "room_message",
     "item": {"message": <history item as HipChat sent it>, "room": <room stub>},
     "connection": {"id": 1, "name": "..."}, "subscription": {"id": 7, "name": "..."},
     "matches": ["foo"], "message": "ping foo", "idempotency_key": "sub:7:<message id>"}

Every payload has these seven top-level keys; ``matches`` is ``[]`` and ``message`` is ``""``
when the event has none. ``item`` per event:

=======================  ==========================================================
``room_message``         ``{message, room}``
``room_notification``    ``{message, room}`` (``message.from`` is a string or null)
``room_file_upload``     ``{message, room, file, sender}`` (``message`` carries ``file``)
``room_topic_change``    ``{room, sender, topic}``
``room_enter``/``_exit`` ``{room, sender}``
``room_created`` etc.    ``{room}`` (polling cannot know who did it, so no ``sender``)
=======================  ==========================================================

``sender`` is the user stub when HipChat's ``from`` is an object, ``{"name": label}`` when
it is a string, and ``null`` when it is null. Payloads are plain JSON (strings, numbers,
lists, dicts; dates stay HipChat's strings) and are deep copies, never aliases of parsed
objects. **No token can appear**: connection and subscription are reduced to ``id`` and
``name``, and query strings are cut from every URL under a ``links`` key.

Idempotency keys: ``sub:<subscription id>:<item key>``, stable across processes and retries.
Item keys, chosen so that "the same observation twice" gives the same key and "the same
thing happening again" gives a new one:

* history events: the message id (a UUID; one item fires exactly one event, see
  :func:`tasks.diff.classify`).
* ``room_created`` / ``room_deleted``: ``room:<id>:<event>``. Each happens at most once per
  room id, so a room list that flickers can never fire either twice.
* ``room_archived`` / ``room_unarchived``: ``room:<id>:<event>:g<generation>``, and
  participants: ``participant:<room>:<user>:<event>:g<generation>``. ``generation``
  identifies the **stored snapshot the diff was computed against**: a counter, or the time
  that snapshot was stored (any ``int`` or ``str`` that changes whenever a new snapshot is
  committed and not otherwise; never the poll's own clock). Two polls of the same
  stored state (a redelivered task, a second beat, a retry after a crash before commit) see
  the same generation and produce the same keys; archive, unarchive, archive again are three
  commits, hence three generations and three keys. HipChat's room ``version`` was considered
  and not used: two concurrent polls of the same transition can fetch different versions if
  anything else about the room changed in between (so one transition would fire twice), and
  participants have no version that changes on enter/exit. Keying on the previous state
  alone is not enough either: after archive, unarchive, the second archive sees the same
  previous state as the first and would be swallowed as a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

from storage.rooms import RoomSnapshot
from storage.vocabulary import PARTICIPANT_EVENTS, ROOM_LIST_EVENTS, Event
from tasks.hipchat_types import Message, Room, UserStub
from tasks.rooms_diff import RoomChange

MAX_KEY_CHARS = 200
_ONCE_PER_ROOM = frozenset({Event.ROOM_CREATED, Event.ROOM_DELETED})

JSON = dict[str, Any]
Generation = int | str


def idempotency_key(subscription_id: int, item_key: str) -> str:
    """``sub:<id>:<item_key>``; item keys that would make it longer than
    :data:`MAX_KEY_CHARS` are replaced by ``sha256:<hex>`` of the item key."""
    key = f"sub:{subscription_id}:{item_key}"
    if len(key) <= MAX_KEY_CHARS:
        return key
    return f"sub:{subscription_id}:sha256:{hashlib.sha256(item_key.encode()).hexdigest()}"


def message_item_key(msg: Message) -> str:
    return msg.id


def room_item_key(change: RoomChange, *, generation: Generation) -> str:
    """See the module docstring; ``generation`` is ignored for created/deleted."""
    base = f"room:{change.room.id}:{change.event}"
    return base if change.event in _ONCE_PER_ROOM else f"{base}:g{generation}"


def participant_item_key(room_id: int, user_id: int, event: str, *, generation: Generation) -> str:
    return f"participant:{room_id}:{user_id}:{event}:g{generation}"


def _json_copy(value: Any, *, in_links: bool = False) -> Any:
    """A deep copy of JSON data with query strings cut from URLs under ``links``."""
    if isinstance(value, dict):
        return {k: _json_copy(v, in_links=in_links or k == "links") for k, v in value.items()}
    if isinstance(value, list):
        return [_json_copy(v, in_links=in_links) for v in value]
    if in_links and isinstance(value, str):
        return value.split("?", 1)[0].split("#", 1)[0]
    return value


def room_stub(base_url: str, room_id: int, name: str) -> JSON:
    """A room stub in the shape ``GET /v2/room`` lists (reference §4.1), for when only the
    id and name are at hand. ``base_url`` is the connection's (``https://host`` or
    ``https://host/v2``); any credentials, query or fragment in it are dropped."""
    parts = urlsplit(base_url)
    root = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    room = f"{root if root.endswith('/v2') else root + '/v2'}/room/{room_id}"
    links = {"self": room, "webhooks": f"{room}/webhook", "members": f"{room}/member"}
    return {"id": room_id, "name": name, "links": links | {"participants": f"{room}/participant"}}


def _identity(obj: Mapping[str, Any]) -> JSON:
    """Only ``id`` and ``name``: whatever else a caller's dict holds (a token) stays out."""
    return {"id": obj["id"], "name": obj.get("name")}


def _envelope(
    event: str,
    item: JSON,
    *,
    connection: Mapping[str, Any],
    subscription: Mapping[str, Any],
    item_key: str,
    matches: list[str] | None = None,
    text: str = "",
) -> JSON:
    return {
        "event": event,
        "item": _json_copy(item),
        "connection": _identity(connection),
        "subscription": _identity(subscription),
        "matches": [str(m) for m in matches or []],
        "message": text,
        "idempotency_key": idempotency_key(int(subscription["id"]), item_key),
    }


def _sender(msg: Message) -> JSON | None:
    raw_from = msg.raw.get("from")
    if isinstance(raw_from, dict):
        return raw_from
    return {"name": raw_from} if isinstance(raw_from, str) else None


def _message_item(msg: Message, room: JSON) -> JSON:
    return {"message": msg.raw, "room": room}


def _file_item(msg: Message, room: JSON) -> JSON:
    return {"message": msg.raw, "room": room, "file": msg.raw.get("file"), "sender": _sender(msg)}


def _topic_item(msg: Message, room: JSON) -> JSON:
    return {"room": room, "sender": _sender(msg), "topic": msg.text}


_HISTORY_ITEMS: dict[str, Callable[[Message, JSON], JSON]] = {
    Event.ROOM_MESSAGE: _message_item,
    Event.ROOM_NOTIFICATION: _message_item,
    Event.ROOM_FILE_UPLOAD: _file_item,
    Event.ROOM_TOPIC_CHANGE: _topic_item,
}


def message_event(
    event_name: str,
    msg: Message,
    room: Mapping[str, Any],
    *,
    connection: Mapping[str, Any],
    subscription: Mapping[str, Any],
    matches: list[str] | None,
) -> JSON:
    """The payload of a history event (``event_name`` from :func:`tasks.diff.classify`).
    ``room`` is the room stub JSON (``Room.raw``); ``message`` is the item's text."""
    build = _HISTORY_ITEMS.get(event_name)
    if build is None:
        raise ValueError(f"not a history event: {event_name!r}")
    item = build(msg, dict(room))
    return _envelope(
        event_name,
        item,
        connection=connection,
        subscription=subscription,
        item_key=message_item_key(msg),
        matches=matches,
        text=msg.text,
    )


def _room_json(room: Room | RoomSnapshot, base_url: str | None) -> JSON:
    if isinstance(room, Room):
        return dict(room.raw)
    stub = room_stub(base_url, room.id, room.name) if base_url else {}
    return stub | asdict(room)


def room_event(
    change: RoomChange,
    *,
    connection: Mapping[str, Any],
    subscription: Mapping[str, Any],
    generation: Generation,
    base_url: str | None = None,
) -> JSON:
    """The payload of a room-list event; ``item.room`` is the stub HipChat listed, or for a
    deleted room the stored state (``id, name, privacy, is_archived, topic``), plus the stub's
    ``links`` when ``base_url`` is given."""
    if change.event not in ROOM_LIST_EVENTS:
        raise ValueError(f"not a room event: {change.event!r}")
    return _envelope(
        change.event,
        {"room": _room_json(change.room, base_url)},
        connection=connection,
        subscription=subscription,
        item_key=room_item_key(change, generation=generation),
    )


def participant_event(
    event_name: str,
    user: UserStub | Mapping[str, Any],
    room: Mapping[str, Any],
    *,
    connection: Mapping[str, Any],
    subscription: Mapping[str, Any],
    generation: Generation,
) -> JSON:
    """The payload of ``room_enter`` / ``room_exit``: ``item = {room, sender}``. ``user`` is
    the participant's stub, or for a stored participant its JSON (at least ``id``)."""
    if event_name not in PARTICIPANT_EVENTS:
        raise ValueError(f"not a participant event: {event_name!r}")
    sender = user.raw if isinstance(user, UserStub) else dict(user)
    key = participant_item_key(
        int(room["id"]), int(sender["id"]), event_name, generation=generation
    )
    return _envelope(
        event_name,
        {"room": dict(room), "sender": sender},
        connection=connection,
        subscription=subscription,
        item_key=key,
    )
