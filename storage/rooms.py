"""The known room set and the known participants per room: the baselines that the room-list
and participant diffs compare against.

Each ``replace_*`` writes only what changed and sets the stream's priming marker (see
:mod:`storage.models`) in the same transaction, so "primed" always means "baseline stored".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.db import chunks, upsert
from storage.models import KnownParticipant, KnownRoom, utcnow
from storage.vocabulary import ROOM_LIST_ROOM_ID, Stream
from storage.watermarks import mark_stream_primed


@dataclass(frozen=True, slots=True)
class RoomSnapshot:
    """What is stored about a room between polls (the baseline of the room-list diff)."""

    id: int
    name: str
    privacy: str
    is_archived: bool
    topic: str | None = None

    @classmethod
    def of(cls, room: Any) -> RoomSnapshot:
        """From any object with HipChat's room attributes (id, name, privacy, is_archived,
        topic), such as a parsed room stub."""
        topic = getattr(room, "topic", None)
        return cls(int(room.id), room.name, room.privacy, bool(room.is_archived), topic)


@dataclass(frozen=True, slots=True)
class ParticipantSnapshot:
    user_id: int
    name: str
    mention_name: str

    @classmethod
    def of(cls, user: Any) -> ParticipantSnapshot:
        """From any object with HipChat's user attributes (id, name, mention_name)."""
        return cls(int(user.id), user.name, user.mention_name)


def known_rooms(s: Session, conn_id: int) -> dict[int, KnownRoom]:
    """The stored room rows by room id (:func:`room_snapshot` of each is the baseline)."""
    query = select(KnownRoom).where(KnownRoom.connection_id == conn_id)
    rows = s.scalars(query.execution_options(populate_existing=True))
    return {room.room_id: room for room in rows}


def replace_known_rooms(
    s: Session,
    conn_id: int,
    rooms: Sequence[RoomSnapshot],
    *,
    at: datetime | None = None,
    known: Mapping[int, KnownRoom] | None = None,
) -> None:
    """Make the stored room set equal to ``rooms`` and mark the room list primed.

    ``known`` is what :func:`known_rooms` returned earlier in the same transaction, if the
    caller has it: it saves reading the set again."""
    now = at or utcnow()
    stored = known if known is not None else known_rooms(s, conn_id)
    existing = {rid: room_snapshot(row) for rid, row in stored.items()}
    wanted = {room.id: room for room in rooms}
    for part in chunks([rid for rid in existing if rid not in wanted]):
        s.execute(
            delete(KnownRoom).where(KnownRoom.connection_id == conn_id, KnownRoom.room_id.in_(part))
        )
    changed = [
        {
            "connection_id": conn_id,
            "room_id": rid,
            "name": room.name,
            "privacy": room.privacy,
            "is_archived": room.is_archived,
            "topic": room.topic,
            "updated_at": now,
        }
        for rid, room in wanted.items()
        if existing.get(rid) != room
    ]
    upsert(s, KnownRoom, changed, ["connection_id", "room_id"])
    mark_stream_primed(s, conn_id, ROOM_LIST_ROOM_ID, Stream.ROOMS, now)


def known_participants(s: Session, conn_id: int, room_id: int) -> dict[int, KnownParticipant]:
    query = select(KnownParticipant).where(
        KnownParticipant.connection_id == conn_id, KnownParticipant.room_id == room_id
    )
    rows = s.scalars(query.execution_options(populate_existing=True))
    return {row.user_id: row for row in rows}


def replace_participants(
    s: Session,
    conn_id: int,
    room_id: int,
    participants: Sequence[ParticipantSnapshot],
    *,
    at: datetime | None = None,
    known: Mapping[int, KnownParticipant] | None = None,
) -> None:
    """Make the stored participants of one room equal to ``participants``; mark it primed.

    ``known``: as for :func:`replace_known_rooms`."""
    now = at or utcnow()
    stored = known if known is not None else known_participants(s, conn_id, room_id)
    existing = {
        uid: ParticipantSnapshot(uid, row.name, row.mention_name) for uid, row in stored.items()
    }
    wanted = {p.user_id: p for p in participants}
    for part in chunks([uid for uid in existing if uid not in wanted]):
        s.execute(
            delete(KnownParticipant).where(
                KnownParticipant.connection_id == conn_id,
                KnownParticipant.room_id == room_id,
                KnownParticipant.user_id.in_(part),
            )
        )
    changed = [
        {"connection_id": conn_id, "room_id": room_id, **asdict(p), "updated_at": now}
        for uid, p in wanted.items()
        if existing.get(uid) != p
    ]
    upsert(s, KnownParticipant, changed, ["connection_id", "room_id", "user_id"])
    mark_stream_primed(s, conn_id, room_id, Stream.PARTICIPANTS, now)


def room_snapshot(row: KnownRoom) -> RoomSnapshot:
    return RoomSnapshot(row.room_id, row.name, row.privacy, row.is_archived, row.topic)
