"""The relational model: connections, subscriptions, watermarks, known rooms, the outbox.

Enumerations are short strings guarded by CHECK constraints (portable, trivially migrated);
their values are the vocabularies of :mod:`storage.vocabulary`.
Every datetime is an aware UTC ``datetime`` on both backends (see :class:`UTCDateTime`).

Priming markers live in ``watermarks`` so that one upsert serves every stream:

* ``(connection_id, 0, 'rooms')``: the connection's room list has been primed;
* ``(connection_id, room_id, 'participants')``: that room's participant list has been primed;
* ``(connection_id, room_id, 'history')``: the newest history item seen in that room.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.vocabulary import (
    ConnectionState,
    Event,
    OutboxState,
    Stream,
    SubscriptionState,
    TargetKind,
)

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
# Subscription names may carry the reserved prefixes "recipe:" and "handler:module:function".
SUBSCRIPTION_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,255}$"

# Stable constraint names: Alembic needs them, and storage.db maps them to messages.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, vocabulary: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(m.value) for m in vocabulary)})"


def _name_key(context: Any) -> str:
    """A connection's name in lower case, for the case-insensitive unique rule."""
    return str(context.get_current_parameters()["name"]).lower()


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC in, aware UTC out, on every backend.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: values are stored as naive
    UTC text (fixed width, so text order is time order) and read back as aware UTC.
    A naive datetime is refused: its meaning would depend on the host's clock settings.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# Plain JSON, also on PostgreSQL: a payload reads back exactly as written (JSONB would
# reorder keys), and nothing ever queries inside these documents.
JSONDocument = JSON()
# SQLite only auto-increments INTEGER PRIMARY KEY, not BIGINT.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDocument}


class Connection(Base):
    """One HipChat base URL plus one personal access token (stored encrypted)."""

    __tablename__ = "connections"
    __table_args__ = (
        UniqueConstraint("name"),
        CheckConstraint(_in("state", ConnectionState), name="state"),
        # Names are told apart case-insensitively: "Ops" and "ops" would confuse people.
        UniqueConstraint("name_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    name_key: Mapped[str] = mapped_column(String(64), default=_name_key)  # names never change
    base_url: Mapped[str] = mapped_column(Text)
    token_encrypted: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="active")
    state_reason: Mapped[str | None] = mapped_column(Text)
    # Seconds into each poll interval at which this connection polls, derived from the
    # name so that connections spread over the interval and keep their slot across restarts.
    poll_offset_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Indexed: beat reads the connections changed since its last look every few seconds.
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)

    def __repr__(self) -> str:  # never shows the token, not even encrypted
        return f"Connection(id={self.id!r}, name={self.name!r}, state={self.state!r})"


class Subscription(Base):
    """One trigger: an event in a room (or the room list) sent to one downstream target."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        UniqueConstraint("connection_id", "name"),
        CheckConstraint(_in("event", Event), name="event"),
        CheckConstraint(_in("target_kind", TargetKind), name="target_kind"),
        CheckConstraint(_in("state", SubscriptionState), name="state"),
        CheckConstraint("backfill >= 0", name="backfill"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(32))
    room: Mapped[str | None] = mapped_column(Text)  # as the user wrote it: name or id
    room_id: Mapped[int | None] = mapped_column(BigInteger)  # resolved by the poller
    room_name: Mapped[str | None] = mapped_column(Text)  # HipChat's name of room_id
    filter: Mapped[str | None] = mapped_column(Text)  # regex, validated by the caller
    target_kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    backfill: Mapped[int] = mapped_column(Integer, default=0)
    # Fire on what the connection itself posted too (off: a reply never answers itself).
    include_own: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    state: Mapped[str] = mapped_column(String(16), default="active")
    state_reason: Mapped[str | None] = mapped_column(Text)
    primed_at: Mapped[datetime | None]  # null until the first poll recorded the room's state
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def __repr__(self) -> str:
        return (
            f"Subscription(id={self.id!r}, connection_id={self.connection_id!r}, "
            f"event={self.event!r}, room={self.room!r}, state={self.state!r})"
        )


class Watermark(Base):
    """The newest item seen per (connection, room, stream); also the priming markers."""

    __tablename__ = "watermarks"
    __table_args__ = (CheckConstraint(_in("stream", Stream), name="stream"),)

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    stream: Mapped[str] = mapped_column(String(16), primary_key=True)
    last_id: Mapped[str | None] = mapped_column(Text)  # null for the priming markers
    last_date: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ConnectionHealth(Base):
    """How a connection's polls are going, written by the polls in batches (status reads it).

    ``rooms`` maps a room id (as text) to ``{"error", "since", "attempts", "retry_at"}`` for
    each room failing on its own. Kept apart from ``connections`` so that health writes never
    look like configuration changes (beat refreshes connections by ``updated_at``)."""

    __tablename__ = "connection_health"

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    last_poll_at: Mapped[datetime | None]
    last_ok_at: Mapped[datetime | None]
    status: Mapped[str | None] = mapped_column(Text)
    failing_since: Mapped[datetime | None]
    rooms: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    # The streams the last poll did not reach ("history:10001", ...): read first next time.
    behind: Mapped[list[str] | None] = mapped_column(JSON)


class KnownRoom(Base):
    """The connection's room list as last seen, diffed for room_created/archived/deleted."""

    __tablename__ = "known_rooms"

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    privacy: Mapped[str] = mapped_column(String(16))
    is_archived: Mapped[bool]
    topic: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class KnownParticipant(Base):
    """A room's participant list as last seen, diffed for room_enter/room_exit."""

    __tablename__ = "known_participants"

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), primary_key=True
    )
    room_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    mention_name: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class OutboxEvent(Base):
    """One event for one subscription, written in the same transaction as the watermark."""

    __tablename__ = "outbox_events"
    __table_args__ = (
        UniqueConstraint("idempotency_key"),
        CheckConstraint(_in("state", OutboxState), name="state"),
        Index("ix_outbox_events_state_dispatched_at", "state", "dispatched_at"),
        Index("ix_outbox_events_state_created_at", "state", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    connection_id: Mapped[int] = mapped_column(
        ForeignKey("connections.id", ondelete="CASCADE"), index=True
    )
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), index=True
    )
    idempotency_key: Mapped[str] = mapped_column(String(255))
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str | None] = mapped_column(Text)  # one line from the target on delivery
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    # Every delivery attempt: [{"at", "outcome" or "error", "ms"}], oldest first (capped).
    attempt_log: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    def __repr__(self) -> str:
        return (
            f"OutboxEvent(id={self.id!r}, key={self.idempotency_key!r}, "
            f"event={self.event!r}, state={self.state!r})"
        )
