"""Room-list and participant-list diffs: pure functions over two snapshots.

The poll task stores a snapshot (``snapshot(rooms)``, or participants by id), fetches the
current list, diffs, and commits the events with the new snapshot in one transaction.

Preconditions the caller owns, because a diff cannot tell a partial list from a change:

* ``current`` is the **complete** room list: every page, fetched with
  ``include-archived=true`` (HipChat leaves archived rooms out by default, reference §4.1) and
  ``include-private=true``. Then a room that disappears was deleted, not archived.
* A failed or malformed fetch is never diffed (it would read as "everything was deleted").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from storage.rooms import RoomSnapshot
from storage.vocabulary import Event
from tasks.hipchat_types import Room, UserStub


@dataclass(frozen=True)
class RoomChange:
    """One room event. ``room`` is the fresh :class:`Room` from the list, or the stored
    :class:`~storage.rooms.RoomSnapshot` for ``room_deleted`` (the room is no longer listed)."""

    event: Event
    room: Room | RoomSnapshot


def snapshot(rooms: Iterable[Room]) -> dict[int, RoomSnapshot]:
    """The state to store after a poll, keyed by room id."""
    return {room.id: RoomSnapshot.of(room) for room in rooms}


def _changes_of(room: Room, before: RoomSnapshot | None) -> list[RoomChange]:
    if before is None:
        # Created and archived between two polls: both happened, report both, in order.
        events = [Event.ROOM_CREATED]
        if room.is_archived:
            events.append(Event.ROOM_ARCHIVED)
    elif room.is_archived != before.is_archived:
        events = [Event.ROOM_ARCHIVED if room.is_archived else Event.ROOM_UNARCHIVED]
    else:
        events = []  # renames, privacy and topic changes are not room-list events
    return [RoomChange(event, room) for event in events]


def diff_rooms(known: Mapping[int, RoomSnapshot], current: list[Room]) -> list[RoomChange]:
    """Room events between the stored snapshot and the complete current list.

    Order: created/archived/unarchived in the order of ``current``, then deleted rooms by
    ascending id. Topic changes are not reported here: they come from history items.
    """
    changes = [change for room in current for change in _changes_of(room, known.get(room.id))]
    listed = {room.id for room in current}
    gone = sorted(room_id for room_id in known if room_id not in listed)
    return changes + [RoomChange(Event.ROOM_DELETED, known[room_id]) for room_id in gone]


_Stored = TypeVar("_Stored")


def participant_snapshot(users: Iterable[UserStub]) -> dict[int, UserStub]:
    """The participants to store after a poll, keyed by user id."""
    return {user.id: user for user in users}


def diff_participants(
    known: Mapping[int, _Stored], current: list[UserStub]
) -> tuple[list[UserStub], list[_Stored]]:
    """``(entered, exited)``. ``known`` maps user id to whatever was stored for that user
    (a ``UserStub``, a row, a JSON dict); exited users are returned as stored, in the order
    of ``known``. Entered users keep the order of ``current``, duplicates dropped."""
    entered = list(participant_snapshot(u for u in current if u.id not in known).values())
    listed = {user.id for user in current}
    exited = [user for user_id, user in known.items() if user_id not in listed]
    return entered, exited
