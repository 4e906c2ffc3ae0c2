"""What one poll of a connection reads, and in which order: the poll's one read statement
and pure planning.

* :func:`load`: in **one** statement, the connection (its token decrypted, cached per
  process), its active subscriptions, the watermarks of their rooms and its health; the
  baselines the participant and room-list diffs compare against only when a subscription
  needs them. A quiet poll of history triggers reads nothing else.
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

from sqlalchemy import bindparam, func, select
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


# The quiet poll's whole read, one statement: the connection and its health, each active
# subscription, and the watermarks of the rooms they watch (the room list's for a room-list
# subscription). A subscription on a room with two streams read (history and participants)
# comes twice, once per watermark; the rows are folded back in _read.
_H, _S, _W = ConnectionHealth, Subscription, Watermark
_ONE_READ = (
    select(
        # Labelled so that a row reads as a subscription (SubView.of) and as a health record
        # (Health.of): both take the attributes they need.
        Connection.id.label("connection_id"), Connection.state,
        Connection.name.label("conn_name"), Connection.base_url, Connection.token_encrypted,
        _H.connection_id.label("health_of"), _H.last_poll_at, _H.last_ok_at, _H.status,
        _H.failing_since, _H.rooms, _H.behind,
        _S.id, _S.name, _S.event, _S.room, _S.room_id, _S.room_name,
        _S.filter, _S.target_kind, _S.target, _S.backfill, _S.primed_at, _S.include_own,
        _W.room_id.label("mark_room"), _W.stream, _W.last_id, _W.last_date,
    )
    .select_from(Connection)
    .outerjoin(_H, _H.connection_id == Connection.id)
    .outerjoin(
        _S, (_S.connection_id == Connection.id) & (_S.state == SubscriptionState.ACTIVE)
    )
    .outerjoin(
        _W,
        (_W.connection_id == Connection.id)
        & (_W.room_id == func.coalesce(_S.room_id, ROOM_LIST_ROOM_ID)),
    )
    .where(Connection.id == bindparam("connection_id"))
    .order_by(_S.id)
)  # fmt: skip


def _read(s: Session, connection_id: int) -> tuple[Any, ...] | None:
    rows = s.execute(_ONE_READ, {"connection_id": connection_id}).all()
    if not rows or rows[0].state != ConnectionState.ACTIVE:
        return None
    first = rows[0]
    views: dict[int, SubView] = {}
    marks: dict[tuple[int, str], HistoryMark] = {}
    for row in rows:
        if row.id is not None and row.id not in views:
            views[row.id] = SubView.of(row)
        if row.stream is not None:
            marks[(row.mark_room, row.stream)] = HistoryMark(row.last_id, row.last_date)
    subscriptions = list(views.values())
    participant_rooms = [
        v.room_id for v in subscriptions if v.event in PARTICIPANT_EVENTS and v.room_id
    ]
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
    if any(v.event in ROOM_LIST_EVENTS for v in subscriptions):
        rooms = {
            r.room_id: room_snapshot(r)
            for r in s.scalars(select(KnownRoom).where(KnownRoom.connection_id == connection_id))
        }
    conn = ConnView(connection_id, first.conn_name, first.base_url)
    health = Health.of(first if first.health_of is not None else None, connection_id)
    return conn, first.token_encrypted, subscriptions, marks, health, dict(participants), rooms


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
