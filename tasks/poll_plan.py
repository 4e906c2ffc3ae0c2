"""What one poll of a connection reads, and in which order: pure planning plus the loading of
the connection and its subscriptions.

* :func:`load`: the connection (with its decrypted token) and its active subscriptions.
* :func:`resolve_rooms`: every room subscription gets its numeric room id and HipChat's name
  (one lookup per unresolved room, stored, so only the first poll pays it).
* :func:`plan`: the streams the subscriptions need, each read once whatever the number of
  triggers on it, the least recently polled first.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from storage import connections as conns
from storage import subscriptions as subs
from storage import watermarks
from storage.errors import NotFound
from storage.models import Watermark
from storage.vocabulary import (
    HISTORY_EVENTS,
    PARTICIPANT_EVENTS,
    ROOM_LIST_EVENTS,
    ROOM_LIST_ROOM_ID,
    Stream,
)
from tasks.client import HipChatClient
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView

log = logging.getLogger(__name__)

NEVER = datetime.min.replace(tzinfo=UTC)


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


def load(rt: Runtime, connection_id: int) -> tuple[ConnView, str, list[SubView]] | None:
    """The connection, its token and its active subscriptions; None if it is not active."""
    with rt.db.session() as s:
        row = conns.get_connection(s, connection_id)
        if row is None or row.state != "active":
            return None
        token = conns.decrypt_token(row, rt.cipher)
        views = [SubView.of(x) for x in subs.active_subscriptions(s, connection_id)]
        return ConnView(row.id, row.name, row.base_url), token, views


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


def order(
    streams: list[StreamRead],
    marks: Mapping[tuple[int, str], Watermark],
    done_since: datetime | None = None,
) -> list[StreamRead]:
    """``streams`` the least recently polled first (never polled: first of all); those polled
    at or after ``done_since`` are left out. Pure: ``marks`` are the connection's watermarks
    by ``(room_id, stream)``."""
    polled = {}
    for stream in streams:
        mark = marks.get((stream.room_id, stream.kind))
        polled[(stream.kind, stream.room_id)] = mark.updated_at if mark else NEVER
    if done_since is not None:
        streams = [x for x in streams if polled[(x.kind, x.room_id)] < done_since]
    return sorted(streams, key=lambda x: polled[(x.kind, x.room_id)])  # stable on ties


def plan(
    rt: Runtime, conn_id: int, views: list[SubView], done_since: datetime | None = None
) -> list[StreamRead]:
    """Every stream the subscriptions need, in :func:`order`.

    A poll that runs out of budget stops (BucketEmpty) and the next one starts again: in a
    fixed order the streams at the end would never be reached. ``done_since`` is when an
    earlier attempt of the same interval's poll started: what it did is not done twice.
    """
    with rt.db.session() as s:
        marks = watermarks.connection_watermarks(s, conn_id)
    return order(streams_of(views), marks, done_since)
