"""The known room set and the known participants per room: the baselines that the room-list
and participant diffs compare against.

Each ``replace_*`` writes only what changed and sets the stream's priming marker (see
:mod:`storage.models`) in the same transaction, so "primed" always means "baseline stored".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from storage.db import chunks, upsert
from storage.models import KnownParticipant, KnownRoom, utcnow
from storage.vocabulary import ROOM_LIST_ROOM_ID, Stream
from storage.watermarks import mark_stream_primed

Snapshot = TypeVar("Snapshot")


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
    _sync(
        s,
        KnownRoom,
        {"connection_id": conn_id},
        "room_id",
        {rid: room_snapshot(row) for rid, row in stored.items()},
        {room.id: room for room in rooms},
        lambda room: {k: v for k, v in asdict(room).items() if k != "id"} | {"updated_at": now},
    )
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
    _sync(
        s,
        KnownParticipant,
        {"connection_id": conn_id, "room_id": room_id},
        "user_id",
        {uid: ParticipantSnapshot(uid, row.name, row.mention_name) for uid, row in stored.items()},
        {p.user_id: p for p in participants},
        lambda p: {"name": p.name, "mention_name": p.mention_name, "updated_at": now},
    )
    mark_stream_primed(s, conn_id, room_id, Stream.PARTICIPANTS, now)


def _sync(
    s: Session,
    model: type[KnownRoom] | type[KnownParticipant],
    scope: dict[str, int],
    key: str,
    existing: Mapping[int, Snapshot],
    wanted: Mapping[int, Snapshot],
    columns: Callable[[Snapshot], dict[str, Any]],
) -> None:
    """Make the rows of ``model`` within ``scope`` equal ``wanted`` (by ``key``): delete the
    ones gone, upsert only the ones that changed (``columns`` gives their other columns)."""
    in_scope = [getattr(model, column) == value for column, value in scope.items()]
    for part in chunks([k for k in existing if k not in wanted]):
        s.execute(delete(model).where(*in_scope, getattr(model, key).in_(part)))
    changed = [
        {**scope, key: k, **columns(item)} for k, item in wanted.items() if existing.get(k) != item
    ]
    upsert(s, model, changed, [*scope, key])


def room_snapshot(row: KnownRoom) -> RoomSnapshot:
    return RoomSnapshot(row.room_id, row.name, row.privacy, row.is_archived, row.topic)
