"""Event payloads and idempotency keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from storage.rooms import RoomSnapshot
from tasks.diff import classify
from tasks.events import (
    MAX_KEY_CHARS,
    idempotency_key,
    message_event,
    participant_event,
    participant_item_key,
    room_event,
    room_item_key,
    room_stub,
)
from tasks.hipchat_types import Message, Room, UserStub
from tasks.rooms_diff import RoomChange, diff_rooms, snapshot

SECRET = "s3cr3t-personal-access-token"
API = "https://api.hipchat.com/v2"
CONNECTION = {"id": 3, "name": "acme", "token": SECRET, "base_url": f"{API}?auth_token={SECRET}"}
SUBSCRIPTION = {"id": 7, "name": "ping-pong", "token": SECRET, "filter": "ping (.*)"}
ALICE = {
    "id": 768992,
    "links": {"self": f"{API}/user/768992?auth_token={SECRET}"},
    "mention_name": "AliceA",
    "name": "Alice Anders",
    "version": "F93F44D4",
}
ROOM = {
    "id": 3856578,
    "name": "OpsRoom",
    "privacy": "private",
    "is_archived": False,
    "version": "UDY9AI3A",
    "links": {
        "self": f"{API}/room/3856578?auth_token={SECRET}",
        "participants": f"{API}/room/3856578/participant#{SECRET}",
    },
}
MSG_ID = "f74a26c3-f54e-499d-b3b6-28fc28c932bb"
BASE = {"date": "2017-05-20T13:56:46.750428+00:00", "id": MSG_ID, "mentions": []}
USER_MESSAGE = BASE | {"from": ALICE, "message": "ping foo", "type": "message"}
IMAGE = {"name": "a.png", "size": 41330, "url": "https://s3/a.png", "thumb_url": "https://s3/t.png"}
PDF = {"name": "r.pdf", "size": 9, "url": "https://s3/r.pdf"}
NOTIFICATION = BASE | {
    "card": json.dumps({"style": "link", "title": "Build #42"}),
    "color": "green",
    "from": "Jenkins",
    "message": "<b>Build #42</b> passed",
    "message_format": "html",
    "type": "notification",
}
TOPIC = BASE | {"from": ALICE, "message": "Release day", "type": "topic"}

STRIPPED_ALICE = ALICE | {"links": {"self": f"{API}/user/768992"}}
STRIPPED_ROOM = ROOM | {
    "links": {"self": f"{API}/room/3856578", "participants": f"{API}/room/3856578/participant"}
}


def build(raw: dict[str, Any], matches: list[str] | None = None) -> dict[str, Any]:
    msg = Message.parse(raw)
    event = classify(msg)
    assert event is not None
    return message_event(
        event, msg, ROOM, connection=CONNECTION, subscription=SUBSCRIPTION, matches=matches
    )


def stripped(raw: dict[str, Any]) -> dict[str, Any]:
    return raw | {"from": STRIPPED_ALICE} if isinstance(raw.get("from"), dict) else raw


MESSAGE_CASES = [
    pytest.param(
        USER_MESSAGE,
        ["foo"],
        "room_message",
        {"message": stripped(USER_MESSAGE), "room": STRIPPED_ROOM},
        "ping foo",
        id="user-message",
    ),
    pytest.param(
        USER_MESSAGE | {"message": "", "file": IMAGE},
        None,
        "room_file_upload",
        {
            "message": stripped(USER_MESSAGE) | {"message": "", "file": IMAGE},
            "room": STRIPPED_ROOM,
            "file": IMAGE,
            "sender": STRIPPED_ALICE,
        },
        "",
        id="file-with-thumb",
    ),
    pytest.param(
        USER_MESSAGE | {"message": "the report", "file": PDF},
        None,
        "room_file_upload",
        {
            "message": stripped(USER_MESSAGE) | {"message": "the report", "file": PDF},
            "room": STRIPPED_ROOM,
            "file": PDF,
            "sender": STRIPPED_ALICE,
        },
        "the report",
        id="file-no-thumb",
    ),
    pytest.param(
        NOTIFICATION,
        None,
        "room_notification",
        {"message": NOTIFICATION, "room": STRIPPED_ROOM},
        "<b>Build #42</b> passed",
        id="notification-string-from-card",
    ),
    pytest.param(
        NOTIFICATION | {"from": None},
        None,
        "room_notification",
        {"message": NOTIFICATION | {"from": None}, "room": STRIPPED_ROOM},
        "<b>Build #42</b> passed",
        id="notification-null-from",
    ),
    pytest.param(
        TOPIC,
        None,
        "room_topic_change",
        {"room": STRIPPED_ROOM, "sender": STRIPPED_ALICE, "topic": "Release day"},
        "Release day",
        id="topic-user",
    ),
    pytest.param(
        TOPIC | {"from": "Integration"},
        None,
        "room_topic_change",
        {"room": STRIPPED_ROOM, "sender": {"name": "Integration"}, "topic": "Release day"},
        "Release day",
        id="topic-string-from",
    ),
]


@pytest.mark.parametrize(("raw", "matches", "event", "item", "text"), MESSAGE_CASES)
def test_message_event(
    raw: dict[str, Any], matches: list[str] | None, event: str, item: dict[str, Any], text: str
) -> None:
    payload = build(raw, matches)
    assert payload == {
        "event": event,
        "item": item,
        "connection": {"id": 3, "name": "acme"},
        "subscription": {"id": 7, "name": "ping-pong"},
        "matches": matches or [],
        "message": text,
        "idempotency_key": f"sub:7:{MSG_ID}",
    }
    assert json.loads(json.dumps(payload)) == payload
    assert SECRET not in json.dumps(payload)


def test_payload_is_a_copy_not_an_alias() -> None:
    msg = Message.parse(json.loads(json.dumps(USER_MESSAGE)))
    payload = message_event(
        "room_message", msg, ROOM, connection=CONNECTION, subscription=SUBSCRIPTION, matches=None
    )
    payload["item"]["message"]["message"] = "changed"
    payload["item"]["room"]["name"] = "changed"
    assert msg.raw["message"] == "ping foo"
    assert ROOM["name"] == "OpsRoom"


@pytest.mark.parametrize("event", ["room_enter", "room_created", "message", ""])
def test_message_event_refuses_other_events(event: str) -> None:
    with pytest.raises(ValueError, match="not a history event"):
        message_event(
            event,
            Message.parse(USER_MESSAGE),
            ROOM,
            connection=CONNECTION,
            subscription=SUBSCRIPTION,
            matches=None,
        )


# --- room and participant events -----------------------------------------------------------

ROOM_OBJ = Room.parse(ROOM)
ARCHIVED_OBJ = Room.parse(ROOM | {"is_archived": True, "version": "7AA0D0C1"})
DELETED = RoomSnapshot(3856578, "OpsRoom", "private", False, "On call")


@pytest.mark.parametrize(
    ("change", "room_json"),
    [
        pytest.param(RoomChange("room_created", ROOM_OBJ), STRIPPED_ROOM, id="created"),
        pytest.param(
            RoomChange("room_archived", ARCHIVED_OBJ),
            STRIPPED_ROOM | {"is_archived": True, "version": "7AA0D0C1"},
            id="archived",
        ),
        pytest.param(RoomChange("room_unarchived", ROOM_OBJ), STRIPPED_ROOM, id="unarchived"),
        pytest.param(
            RoomChange("room_deleted", DELETED),
            {
                "id": 3856578,
                "name": "OpsRoom",
                "privacy": "private",
                "is_archived": False,
                "topic": "On call",
            },
            id="deleted-from-stored-state",
        ),
    ],
)
def test_room_event(change: RoomChange, room_json: dict[str, Any]) -> None:
    payload = room_event(change, connection=CONNECTION, subscription=SUBSCRIPTION, generation=4)
    assert payload["event"] == change.event
    assert payload["item"] == {"room": room_json}
    assert (payload["matches"], payload["message"]) == ([], "")
    assert payload["idempotency_key"] == idempotency_key(7, room_item_key(change, generation=4))
    assert json.loads(json.dumps(payload)) == payload
    assert SECRET not in json.dumps(payload)


def test_room_event_refuses_other_events() -> None:
    with pytest.raises(ValueError, match="not a room event"):
        room_event(
            RoomChange("room_message", ROOM_OBJ),
            connection=CONNECTION,
            subscription=SUBSCRIPTION,
            generation=1,
        )


@pytest.mark.parametrize("event", ["room_enter", "room_exit"])
def test_participant_event(event: str) -> None:
    bob = UserStub.parse(ALICE | {"id": 5309253, "name": "Bob", "mention_name": "bobb"})
    payload = participant_event(
        event, bob, ROOM, connection=CONNECTION, subscription=SUBSCRIPTION, generation=9
    )
    sender = STRIPPED_ALICE | {"id": 5309253, "name": "Bob", "mention_name": "bobb"}
    assert payload["item"] == {"room": STRIPPED_ROOM, "sender": sender}
    assert payload["idempotency_key"] == f"sub:7:participant:3856578:5309253:{event}:g9"
    assert SECRET not in json.dumps(payload)


def test_participant_event_refuses_other_events() -> None:
    bob = UserStub.parse(ALICE)
    with pytest.raises(ValueError, match="not a participant event"):
        participant_event(
            "room_message",
            bob,
            ROOM,
            connection=CONNECTION,
            subscription=SUBSCRIPTION,
            generation=1,
        )


# --- idempotency keys ----------------------------------------------------------------------


def test_idempotency_key_is_stable_and_readable() -> None:
    # Literal values: a change of the derivation changes every key already delivered.
    assert idempotency_key(7, MSG_ID) == "sub:7:f74a26c3-f54e-499d-b3b6-28fc28c932bb"
    assert idempotency_key(12, "room:5:room_created") == "sub:12:room:5:room_created"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param((7, MSG_ID), (8, MSG_ID), id="other-subscription"),
        pytest.param((7, MSG_ID), (7, MSG_ID.replace("f", "e")), id="other-message"),
        pytest.param((7, "x" * 300), (7, "x" * 299 + "y"), id="long-keys"),
        pytest.param((1, "2:x"), (12, "x"), id="no-separator-confusion"),
    ],
)
def test_idempotency_keys_are_distinct(a: tuple[int, str], b: tuple[int, str]) -> None:
    assert idempotency_key(*a) != idempotency_key(*b)


def test_long_item_keys_are_hashed_stably() -> None:
    key = idempotency_key(7, "x" * 500)
    assert len(key) <= MAX_KEY_CHARS
    assert key == "sub:7:sha256:" + hashlib.sha256(b"x" * 500).hexdigest()
    assert key == "sub:7:sha256:c38c2bf3055c516a98ac5d97f30e7c364e827bc0199e1c3415b794afbe55dcad"


def change(event: str, room: Room | RoomSnapshot = ROOM_OBJ) -> RoomChange:
    return RoomChange(event, room)


# (first observation, second observation, same key?)
ROOM_KEY_CASES = [
    pytest.param(
        (change("room_archived"), 4), (change("room_archived"), 4), True, id="same-observation"
    ),
    pytest.param(
        (change("room_archived"), 4), (change("room_archived"), 6), False, id="archived-again-later"
    ),
    pytest.param(
        (change("room_archived"), 4), (change("room_unarchived"), 4), False, id="other-event"
    ),
    pytest.param(
        (change("room_archived"), 4),
        (change("room_archived", ARCHIVED_OBJ), 4),
        True,
        id="version-changed-meanwhile",
    ),
    pytest.param((change("room_created"), 1), (change("room_created"), 9), True, id="created-once"),
    pytest.param(
        (change("room_deleted", DELETED), 1),
        (change("room_deleted", DELETED), 9),
        True,
        id="deleted-once",
    ),
    pytest.param(
        (change("room_created"), 1),
        (change("room_created", Room.parse(ROOM | {"id": 1})), 1),
        False,
        id="other-room",
    ),
]


@pytest.mark.parametrize(("first", "second", "same"), ROOM_KEY_CASES)
def test_room_item_keys(
    first: tuple[RoomChange, int], second: tuple[RoomChange, int], same: bool
) -> None:
    key_a = room_item_key(first[0], generation=first[1])
    key_b = room_item_key(second[0], generation=second[1])
    assert (key_a == key_b) is same


def test_archive_unarchive_archive_gives_three_keys_and_retries_repeat_them() -> None:
    """Three polls, each committing its snapshot (generation + 1); each poll also retried."""
    lists = [[ARCHIVED_OBJ], [ROOM_OBJ], [ARCHIVED_OBJ]]
    known, generation, keys = snapshot([ROOM_OBJ]), 1, []
    for current in lists:
        attempts = [diff_rooms(known, current) for _ in range(2)]  # redelivered poll
        first, retry = ([room_item_key(c, generation=generation) for c in a] for a in attempts)
        assert first == retry
        keys += first
        known, generation = snapshot(current), generation + 1
    assert keys == [
        "room:3856578:room_archived:g1",
        "room:3856578:room_unarchived:g2",
        "room:3856578:room_archived:g3",
    ]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        pytest.param((1, 2, "room_enter", 5), (1, 2, "room_enter", 5), True, id="same-observation"),
        pytest.param((1, 2, "room_enter", 5), (1, 2, "room_enter", 7), False, id="re-entered"),
        pytest.param((1, 2, "room_enter", 5), (1, 2, "room_exit", 5), False, id="enter-vs-exit"),
        pytest.param((1, 2, "room_enter", 5), (1, 3, "room_enter", 5), False, id="other-user"),
        pytest.param((1, 2, "room_enter", 5), (4, 2, "room_enter", 5), False, id="other-room"),
    ],
)
def test_participant_item_keys(
    a: tuple[int, int, str, int], b: tuple[int, int, str, int], same: bool
) -> None:
    key_a = participant_item_key(*a[:3], generation=a[3])
    key_b = participant_item_key(*b[:3], generation=b[3])
    assert (key_a == key_b) is same


@pytest.mark.parametrize(
    "base_url",
    [
        pytest.param("https://api.hipchat.com", id="plain"),
        pytest.param("https://api.hipchat.com/", id="trailing-slash"),
        pytest.param("https://api.hipchat.com/v2", id="with-v2"),
        pytest.param(f"https://me:{SECRET}@api.hipchat.com/v2/?auth_token={SECRET}#x", id="dirty"),
    ],
)
def test_room_stub(base_url: str) -> None:
    room = f"{API}/room/42"
    assert room_stub(base_url, 42, "Ops") == {
        "id": 42,
        "name": "Ops",
        "links": {
            "self": room,
            "webhooks": f"{room}/webhook",
            "members": f"{room}/member",
            "participants": f"{room}/participant",
        },
    }


def test_deleted_room_event_gets_links_from_the_base_url() -> None:
    payload = room_event(
        RoomChange("room_deleted", DELETED),
        connection=CONNECTION,
        subscription=SUBSCRIPTION,
        generation=2,
        base_url="https://api.hipchat.com",
    )
    assert payload["item"]["room"] == room_stub(API, 3856578, "OpsRoom") | {
        "privacy": "private",
        "is_archived": False,
        "topic": "On call",
    }


def test_participant_event_for_a_stored_participant() -> None:
    stored = {"id": 5309253, "name": "Bob", "mention_name": "bobb"}
    payload = participant_event(
        "room_exit",
        stored,
        ROOM,
        connection=CONNECTION,
        subscription=SUBSCRIPTION,
        generation="2018-01-09T04:29:16.864014+00:00",
    )
    assert payload["item"]["sender"] == stored
    assert payload["idempotency_key"] == (
        "sub:7:participant:3856578:5309253:room_exit:g2018-01-09T04:29:16.864014+00:00"
    )
