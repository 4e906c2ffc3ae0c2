"""Watermarks: the newest item seen per (connection, room, stream), and priming markers.

A watermark only moves forward in time: an advance carrying an older date than the stored
one changes nothing, so a late or replayed poll can never make old items look new.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import dialect_insert
from storage.errors import ValidationError
from storage.models import Watermark, utcnow
from storage.vocabulary import Stream, is_one_of, one_of

# The date of a watermark that has seen nothing: older than any item, so all come after it.
EMPTY_DATE = datetime(1970, 1, 1, tzinfo=UTC)


def get_watermark(s: Session, conn_id: int, room_id: int, stream: str) -> Watermark | None:
    query = select(Watermark).where(
        Watermark.connection_id == conn_id,
        Watermark.room_id == room_id,
        Watermark.stream == stream,
    )
    # The row may have been changed by a Core upsert since it entered the identity map.
    return s.scalars(query.execution_options(populate_existing=True)).one_or_none()


def connection_watermarks(s: Session, conn_id: int) -> dict[tuple[int, str], Watermark]:
    """Every watermark and priming marker of a connection, by (room_id, stream): one query."""
    query = select(Watermark).where(Watermark.connection_id == conn_id)
    rows = s.scalars(query.execution_options(populate_existing=True))
    return {(row.room_id, row.stream): row for row in rows}


def advance_watermark(
    s: Session,
    conn_id: int,
    room_id: int,
    stream: str,
    last_id: str | None,
    last_date: datetime,
) -> Watermark:
    """Upsert the watermark unless the stored one is newer; returns the row as it now stands.

    An equal date moves ``last_id`` (items can share a timestamp; the caller passes the last
    one of its ordered page).
    """
    _check(stream)
    insert = dialect_insert(s)(Watermark).values(
        connection_id=conn_id,
        room_id=room_id,
        stream=stream,
        last_id=last_id,
        last_date=last_date,
        updated_at=utcnow(),
    )
    upsert = insert.on_conflict_do_update(
        index_elements=["connection_id", "room_id", "stream"],
        set_={
            "last_id": insert.excluded.last_id,
            "last_date": insert.excluded.last_date,
            "updated_at": insert.excluded.updated_at,
        },
        where=Watermark.last_date <= insert.excluded.last_date,
    ).returning(Watermark)
    # RETURNING gives the row when it was written; nothing when the stored one is newer.
    written: Watermark | None = s.scalars(
        upsert, execution_options={"populate_existing": True}
    ).one_or_none()
    if written is not None:
        return written
    watermark = get_watermark(s, conn_id, room_id, stream)
    assert watermark is not None  # the newer row that won
    return watermark


def mark_stream_primed(s: Session, conn_id: int, room_id: int, stream: str, at: datetime) -> None:
    """Record that a snapshot stream (room list, participants) has a baseline as of ``at``."""
    advance_watermark(s, conn_id, room_id, stream, None, at)


def _check(stream: str) -> None:
    if not is_one_of(Stream, stream):
        raise ValidationError(f"unknown watermark stream {stream!r}: one of {one_of(Stream)}")
