"""What one poll of a connection reads, and in which order: the poll's one read transaction
and pure planning.

* :func:`load`: in **one** read transaction, the connection (its token decrypted, cached per
  process), its active subscriptions, its watermarks, its health, and the baselines the
  participant and room-list diffs compare against. A quiet poll reads nothing else.
* :func:`resolve_rooms`: every room subscription gets its numeric room id and HipChat's name
  (one lookup per unresolved room, stored, so only the first poll pays it).
* :func:`plan`: the streams the subscriptions need, each read once whatever the number of
  triggers on it; the streams the last poll could not reach first; streams already done by an
  earlier attempt of this interval's poll left out.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage import subscriptions as subs
from storage.errors import NotFound
from storage.health import Health, newest
from storage.models import (
    Connection,
    ConnectionHealth,
    KnownParticipant,
    KnownRoom,
    Subscription,
    Watermark,
)
from storage.rooms import ParticipantSnapshot, RoomSnapshot, room_snapshot
from storage.vocabulary import (
    HISTORY_EVENTS,
    PARTICIPANT_EVENTS,
    ROOM_LIST_EVENTS,
    ROOM_LIST_ROOM_ID,
    ConnectionState,
    Stream,
    SubscriptionState,
)
from tasks.client import HipChatClient
from tasks.diff import HistoryMark
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView


@dataclass(frozen=True, slots=True)
class ConnView:
    """A connection detached from its database session (never holds the token)."""

    id: int
    name: str
    base_url: str

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What one poll reads once: a room's history or participants, or the room list."""

    kind: Stream
    room_id: int
    subs: list[SubView]

    @property
    def key(self) -> str:
        """``"history:10001"``: names the stream in the poll task's retries and in health."""
        return f"{self.kind}:{self.room_id}"


@dataclass(slots=True)
class PollState:
    """Everything a poll reads from the database, read in one transaction."""

    conn: ConnView
    token: str
    views: list[SubView]
    # (room_id, stream) -> the mark: a history watermark, or a snapshot's priming time
    marks: dict[tuple[int, str], HistoryMark]
    health: Health
    participants: dict[int, dict[int, ParticipantSnapshot]]  # room_id -> user_id -> stored
    rooms: dict[int, RoomSnapshot] | None  # the stored room list; None when no room trigger


class TokenCache:
    """Decrypted tokens by (connection id, ciphertext), per process: a poll decrypts once per
    token, not once per poll. A new token has a new ciphertext, so nothing goes stale."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()

    def get(self, rt: Runtime, connection_id: int, ciphertext: str) -> str:
        key = (connection_id, ciphertext)
        token = self._tokens.get(key)
        if token is None:
            token = rt.cipher.decrypt(ciphertext)
            with self._lock:
                self._tokens = {k: v for k, v in self._tokens.items() if k[0] != connection_id}
                self._tokens[key] = token
        return token


TOKENS = TokenCache()


def load(rt: Runtime, connection_id: int) -> PollState | None:
    """The poll's one read; None if the connection is gone or not active."""
    state = rt.db.read(lambda s: _read(s, connection_id))
    if state is None:
        return None
    conn, ciphertext, views, marks, health_row, participants, rooms = state
    return PollState(
        conn=conn,
        token=TOKENS.get(rt, connection_id, ciphertext),
        views=views,
        marks=marks,
        # This process's record not written yet, unless another process wrote a newer one.
        health=newest(health_row, rt.health.latest(connection_id)) or health_row,
        participants=participants,
        rooms=rooms,
    )


def _read(s: Session, connection_id: int) -> tuple[Any, ...] | None:
    found = s.execute(
        select(Connection, ConnectionHealth)
        .outerjoin(ConnectionHealth, ConnectionHealth.connection_id == Connection.id)
        .where(Connection.id == connection_id)
    ).one_or_none()
    if found is None or found[0].state != ConnectionState.ACTIVE:
        return None
    row, health_row = found
    views = [
        SubView.of(x)
        for x in s.scalars(
            select(Subscription)
            .where(
                Subscription.connection_id == connection_id,
                Subscription.state == SubscriptionState.ACTIVE,
            )
            .order_by(Subscription.id)
        )
    ]
    marks = {
        (w.room_id, w.stream): HistoryMark(w.last_id, w.last_date)
        for w in s.scalars(select(Watermark).where(Watermark.connection_id == connection_id))
    }
    participant_rooms = [v.room_id for v in views if v.event in PARTICIPANT_EVENTS and v.room_id]
    participants: dict[int, dict[int, ParticipantSnapshot]] = defaultdict(dict)
    if participant_rooms:
        for p in s.scalars(
            select(KnownParticipant).where(
                KnownParticipant.connection_id == connection_id,
                KnownParticipant.room_id.in_(participant_rooms),
            )
        ):
            participants[p.room_id][p.user_id] = ParticipantSnapshot(
                p.user_id, p.name, p.mention_name
            )
    rooms = None
    if any(v.event in ROOM_LIST_EVENTS for v in views):
        rooms = {
            r.room_id: room_snapshot(r)
            for r in s.scalars(select(KnownRoom).where(KnownRoom.connection_id == connection_id))
        }
    conn = ConnView(row.id, row.name, row.base_url)
    health = Health.of(health_row, connection_id)
    return conn, row.token_encrypted, views, marks, health, dict(participants), rooms


def resolve_rooms(
    rt: Runtime,
    client: HipChatClient,
    views: list[SubView],
    room_gone: Callable[[SubView], None],
) -> list[SubView]:
    """Give every room subscription its numeric room id and HipChat's name for it (one lookup
    per unresolved room, once: both are stored). A room HipChat does not know is handed to
    ``room_gone`` and left out."""
    resolved: dict[str, tuple[int, str]] = {}
    out = []
    for view in views:
        if view.event in ROOM_LIST_EVENTS or (view.room_id is not None and view.room_name):
            out.append(view)
            continue
        room = str(view.room_id) if view.room_id is not None else view.room or ""
        if room not in resolved:
            try:
                found = client.find_room(room)
            except NotFound:
                room_gone(view)
                continue
            resolved[room] = (found.id, found.name)
        room_id, room_name = resolved[room]
        with rt.db.session() as s:
            subs.set_room_id(s, view.id, room_id, room_name)
        out.append(replace(view, room_id=room_id, room_name=room_name))
    return out


def group_by_room(views: list[SubView], kinds: Collection[str]) -> dict[int, list[SubView]]:
    grouped: dict[int, list[SubView]] = defaultdict(list)
    for view in views:
        if view.event in kinds and view.room_id is not None:
            grouped[view.room_id].append(view)
    return dict(grouped)


def streams_of(views: list[SubView]) -> list[StreamRead]:
    """Every stream the subscriptions need, each once, in a fixed order."""
    streams = [
        StreamRead(Stream.HISTORY, room_id, room_subs)
        for room_id, room_subs in group_by_room(views, HISTORY_EVENTS).items()
    ]
    streams += [
        StreamRead(Stream.PARTICIPANTS, room_id, room_subs)
        for room_id, room_subs in group_by_room(views, PARTICIPANT_EVENTS).items()
    ]
    listing = [v for v in views if v.event in ROOM_LIST_EVENTS]
    if listing:
        streams.append(StreamRead(Stream.ROOMS, ROOM_LIST_ROOM_ID, listing))
    return streams


def plan(
    views: list[SubView], behind: Collection[str] = (), done: Collection[str] = ()
) -> list[StreamRead]:
    """The streams to read, those the last poll could not reach (``behind``) first, without
    those an earlier attempt of this interval's poll already read (``done``).

    A poll that runs out of budget stops and comes back for the rest; should the rest wait
    for the next interval, ``behind`` keeps the streams at the end of a fixed order from
    never being reached."""
    streams = [x for x in streams_of(views) if x.key not in done]
    first = {key: i for i, key in enumerate(behind)}
    # Those left behind in the order they were left, then the rest in their fixed order.
    return sorted(streams, key=lambda x: first.get(x.key, len(first)))
