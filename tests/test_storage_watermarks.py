"""storage.watermarks and storage.rooms on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session

from storage import connections as conns
from storage import rooms, watermarks
from storage.crypto import TokenCipher
from storage.db import Database
from storage.errors import ValidationError
from storage.models import Connection
from storage.rooms import ParticipantSnapshot, RoomSnapshot

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def test_watermark_moves_forward_only(db: Database, conn: Connection) -> None:
    with db.session() as s:
        assert watermarks.get_watermark(s, conn.id, 7, "history") is None
        assert watermarks.advance_watermark(s, conn.id, 7, "history", "m1", T0).last_id == "m1"
        later = T0 + timedelta(seconds=1)
        assert watermarks.advance_watermark(s, conn.id, 7, "history", "m2", later).last_id == "m2"
        back = watermarks.advance_watermark(s, conn.id, 7, "history", "m0", T0)
        assert (back.last_id, back.last_date) == ("m2", later)
        # Items may share a date: the caller's last item of an ordered page wins.
        same = watermarks.advance_watermark(s, conn.id, 7, "history", "m3", later)
        assert (same.last_id, same.last_date) == ("m3", later)
    with db.session() as s:
        stored = watermarks.get_watermark(s, conn.id, 7, "history")
        assert stored is not None
        assert (stored.last_id, stored.last_date) == ("m3", later)


def test_watermarks_are_per_connection_room_and_stream(
    db: Database, conn: Connection, cipher: TokenCipher
) -> None:
    with db.session() as s:
        other = conns.add_connection(s, "other", "https://h.example", "t", cipher)
        watermarks.advance_watermark(s, conn.id, 7, "history", "a", T0)
        watermarks.advance_watermark(s, conn.id, 8, "history", "b", T0)
        watermarks.advance_watermark(s, other.id, 7, "history", "c", T0)
        watermarks.advance_watermark(s, conn.id, 7, "participants", None, T0)
    with db.session() as s:
        assert [
            getattr(watermarks.get_watermark(s, c, r, st), "last_id", "missing")
            for c, r, st in [
                (conn.id, 7, "history"),
                (conn.id, 8, "history"),
                (other.id, 7, "history"),
                (conn.id, 7, "participants"),
                (other.id, 8, "history"),
            ]
        ] == ["a", "b", "c", None, "missing"]


def test_unknown_stream_is_refused(db: Database, conn: Connection) -> None:
    with pytest.raises(ValidationError, match="unknown watermark stream"), db.session() as s:
        watermarks.advance_watermark(s, conn.id, 7, "files", "x", T0)


def primed(s: Session, conn_id: int, room_id: int, stream: str) -> bool:
    return watermarks.get_watermark(s, conn_id, room_id, stream) is not None


def room(room_id: int, name: str, archived: bool = False, topic: str | None = None) -> RoomSnapshot:
    return RoomSnapshot(room_id, name, "public", archived, topic)


def test_replace_known_rooms_adds_changes_removes_and_primes(
    db: Database, conn: Connection
) -> None:
    with db.session() as s:
        assert not primed(s, conn.id, 0, "rooms")
        assert rooms.known_rooms(s, conn.id) == {}
        rooms.replace_known_rooms(s, conn.id, [room(1, "Dev"), room(2, "Ops")], at=T0)
        assert primed(s, conn.id, 0, "rooms")
        assert sorted(rooms.known_rooms(s, conn.id)) == [1, 2]
    later = T0 + timedelta(minutes=1)
    with db.session() as s:
        current = [room(2, "Ops", archived=True, topic="on fire"), room(3, "New")]
        rooms.replace_known_rooms(s, conn.id, current, at=later)
    with db.session() as s:
        known = rooms.known_rooms(s, conn.id)
        assert sorted(known) == [2, 3]
        assert (known[2].is_archived, known[2].topic, known[2].updated_at) == (
            True,
            "on fire",
            later,
        )
        marker = watermarks.get_watermark(s, conn.id, 0, "rooms")
        assert marker is not None
        assert marker.last_date == later


def test_an_empty_room_list_still_primes(db: Database, conn: Connection) -> None:
    with db.session() as s:
        rooms.replace_known_rooms(s, conn.id, [])
        assert primed(s, conn.id, 0, "rooms")
        assert rooms.known_rooms(s, conn.id) == {}


def test_unchanged_rooms_are_not_rewritten(db: Database, conn: Connection) -> None:
    with db.session() as s:
        rooms.replace_known_rooms(s, conn.id, [room(1, "Dev")], at=T0)
        rooms.replace_known_rooms(s, conn.id, [room(1, "Dev")], at=T0 + timedelta(hours=1))
        assert rooms.known_rooms(s, conn.id)[1].updated_at == T0


def test_many_rooms_in_chunks(db: Database, conn: Connection) -> None:
    many = [room(i, f"room-{i}") for i in range(1, 1201)]
    with db.session() as s:
        rooms.replace_known_rooms(s, conn.id, many)
        rooms.replace_known_rooms(s, conn.id, many[:10])
        assert sorted(rooms.known_rooms(s, conn.id)) == list(range(1, 11))


def test_participants_per_room(db: Database, conn: Connection) -> None:
    alice = ParticipantSnapshot(1, "Alice", "alice")
    bob = ParticipantSnapshot(2, "Bob", "bob")
    with db.session() as s:
        assert not primed(s, conn.id, 10, "participants")
        rooms.replace_participants(s, conn.id, 10, [alice, bob])
        rooms.replace_participants(s, conn.id, 11, [alice])
    with db.session() as s:
        rooms.replace_participants(s, conn.id, 10, [ParticipantSnapshot(1, "Alice A.", "alice")])
    with db.session() as s:
        assert primed(s, conn.id, 10, "participants")
        assert not primed(s, conn.id, 12, "participants")
        in_10 = rooms.known_participants(s, conn.id, 10)
        assert {uid: p.name for uid, p in in_10.items()} == {1: "Alice A."}
        assert sorted(rooms.known_participants(s, conn.id, 11)) == [1]


def test_snapshots_from_parsed_hipchat_objects() -> None:
    stub = SimpleNamespace(id=5, name="Dev", privacy="private", is_archived=False, topic=None)
    assert RoomSnapshot.of(stub) == RoomSnapshot(5, "Dev", "private", False, None)
    user = SimpleNamespace(id=9, name="Alice", mention_name="alice", links={})
    assert ParticipantSnapshot.of(user) == ParticipantSnapshot(9, "Alice", "alice")
