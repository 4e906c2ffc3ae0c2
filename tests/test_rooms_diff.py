"""Room-list and participant diffs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from storage.rooms import RoomSnapshot
from tasks.hipchat_types import Room, UserStub
from tasks.rooms_diff import (
    RoomChange,
    diff_participants,
    diff_rooms,
    participant_snapshot,
    snapshot,
)

API = "https://api.hipchat.com/v2"


def room_json(room_id: int, name: str = "", **extra: Any) -> dict[str, Any]:
    links = {
        "self": f"{API}/room/{room_id}",
        "webhooks": f"{API}/room/{room_id}/webhook",
        "participants": f"{API}/room/{room_id}/participant",
    }
    base = {"id": room_id, "name": name or f"Room {room_id}", "privacy": "public"}
    return base | {"is_archived": False, "version": "UDY9AI3A", "links": links} | extra


def room(room_id: int, **extra: Any) -> Room:
    return Room.parse(room_json(room_id, **extra))


def state(room_id: int, **extra: Any) -> RoomSnapshot:
    return snapshot([room(room_id, **extra)])[room_id]


def user(user_id: int, name: str = "") -> UserStub:
    stub = {"id": user_id, "links": {"self": f"{API}/user/{user_id}"}, "version": "33J960AR"}
    return UserStub.parse(stub | {"mention_name": f"user{user_id}", "name": name or f"U{user_id}"})


def summary(changes: list[RoomChange]) -> list[tuple[str, int]]:
    return [(change.event, change.room.id) for change in changes]


ARCHIVED = {"is_archived": True}

ROOM_CASES = [
    pytest.param({}, [], [], id="both-empty"),
    pytest.param({1: state(1)}, [room(1)], [], id="unchanged"),
    pytest.param({}, [room(1), room(2)], [("room_created", 1), ("room_created", 2)], id="created"),
    pytest.param(
        {},
        [room(3, **ARCHIVED)],
        [("room_created", 3), ("room_archived", 3)],
        id="created-already-archived",
    ),
    pytest.param({1: state(1)}, [room(1, **ARCHIVED)], [("room_archived", 1)], id="archived"),
    pytest.param({1: state(1, **ARCHIVED)}, [room(1)], [("room_unarchived", 1)], id="unarchived"),
    pytest.param({1: state(1, **ARCHIVED)}, [room(1, **ARCHIVED)], [], id="still-archived"),
    pytest.param({1: state(1), 2: state(2)}, [room(1)], [("room_deleted", 2)], id="deleted"),
    pytest.param({1: state(1, name="Ops")}, [room(1, name="OpsRoom")], [], id="renamed"),
    pytest.param({1: state(1)}, [room(1, privacy="private")], [], id="privacy-changed"),
    pytest.param({1: state(1, topic="old")}, [room(1, topic="new")], [], id="topic-changed"),
    pytest.param({1: state(1)}, [room(1, version="ZZZZ0000")], [], id="version-only"),
    pytest.param(
        {5: state(5), 1: state(1), 2: state(2), 9: state(9)},
        [room(4), room(2, **ARCHIVED), room(3)],
        [
            ("room_created", 4),
            ("room_archived", 2),
            ("room_created", 3),
            ("room_deleted", 1),
            ("room_deleted", 5),
            ("room_deleted", 9),
        ],
        id="mixed-stable-order",
    ),
]


@pytest.mark.parametrize(("known", "current", "expected"), ROOM_CASES)
def test_diff_rooms(
    known: dict[int, RoomSnapshot], current: list[Room], expected: list[tuple[str, int]]
) -> None:
    assert summary(diff_rooms(known, current)) == expected


def test_diff_rooms_carries_the_fresh_room_or_the_stored_state() -> None:
    changes = diff_rooms({1: state(1), 2: state(2, name="Gone")}, [room(1, **ARCHIVED)])
    archived, deleted = changes
    assert isinstance(archived.room, Room)
    assert archived.room.raw["version"] == "UDY9AI3A"
    assert deleted.room == RoomSnapshot(2, "Gone", "public", False, None)


def test_snapshot_round_trip_reports_nothing() -> None:
    rooms = [room(1), room(2, **ARCHIVED), room(3, topic="t", privacy="private")]
    known = snapshot(rooms)
    assert known[3] == RoomSnapshot(3, "Room 3", "private", False, "t")
    assert diff_rooms(known, rooms) == []


# --- participants --------------------------------------------------------------------------


def by_id(*ids: int) -> dict[int, UserStub]:
    return participant_snapshot(user(i) for i in ids)


PARTICIPANT_CASES = [
    pytest.param([], [], [], [], id="empty-room"),
    pytest.param([1, 2], [1, 2], [], [], id="unchanged"),
    pytest.param([1], [1, 3, 2], [3, 2], [], id="entered-in-list-order"),
    pytest.param([3, 1, 2], [2], [], [3, 1], id="exited-in-known-order"),
    pytest.param([1, 2], [2, 3], [3], [1], id="both"),
    pytest.param([1], [2, 2, 1], [2], [], id="duplicate-in-current"),
    pytest.param([1, 2], [], [], [1, 2], id="everyone-left"),
]


@pytest.mark.parametrize(("known", "current", "entered", "exited"), PARTICIPANT_CASES)
def test_diff_participants(
    known: list[int], current: list[int], entered: list[int], exited: list[int]
) -> None:
    came, went = diff_participants(by_id(*known), [user(i) for i in current])
    assert [u.id for u in came] == entered
    assert [u.id for u in went] == exited


def test_diff_participants_accepts_any_stored_object_with_an_id() -> None:
    @dataclass(frozen=True)
    class Stored:
        id: int
        name: str

    came, went = diff_participants({1: Stored(1, "A"), 2: Stored(2, "B")}, [user(2), user(3)])
    assert came == [user(3)]
    assert went == [Stored(1, "A")]


def test_diff_participants_ignores_a_renamed_participant() -> None:
    came, went = diff_participants(by_id(1), [user(1, name="Renamed")])
    assert (came, went) == ([], [])


def test_diff_participants_returns_exited_users_as_stored() -> None:
    stored = {1: {"id": 1, "name": "A"}, 2: {"id": 2, "name": "B"}}
    came, went = diff_participants(stored, [user(2)])
    assert (came, went) == ([], [{"id": 1, "name": "A"}])
