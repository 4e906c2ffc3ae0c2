"""Initial schema: connections, subscriptions, watermarks, known rooms/participants, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Self-contained on purpose: a migration must keep meaning what it meant when written, so it
spells out types and value lists instead of importing them from storage.models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENTS = (
    "room_message",
    "room_file_upload",
    "room_notification",
    "room_topic_change",
    "room_enter",
    "room_exit",
    "room_created",
    "room_archived",
    "room_unarchived",
    "room_deleted",
)


def _timestamp(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str) -> sa.Column[object]:
    return sa.Column(name, sa.JSON(), nullable=False)


def _one_of(name: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(name))


def _connection_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["connection_id"],
        ["connections.id"],
        name=op.f(f"fk_{table}_connection_id_connections"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "connections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("token_encrypted", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        sa.Column("poll_offset_seconds", sa.Float(), nullable=False),
        _timestamp("last_poll_at", nullable=True),
        sa.Column("last_poll_status", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _one_of("ck_connections_state", "state", ("active", "paused", "auth_failed")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connections")),
        sa.UniqueConstraint("name", name=op.f("uq_connections_name")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("room", sa.Text(), nullable=True),
        sa.Column("room_id", sa.BigInteger(), nullable=True),
        sa.Column("room_name", sa.Text(), nullable=True),
        sa.Column("filter", sa.Text(), nullable=True),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        _json("target"),
        sa.Column("backfill", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=True),
        _timestamp("primed_at", nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        _one_of("ck_subscriptions_event", "event", EVENTS),
        _one_of("ck_subscriptions_state", "state", ("active", "paused", "error")),
        _one_of(
            "ck_subscriptions_target_kind", "target_kind", ("webhook", "log", "action", "handler")
        ),
        sa.CheckConstraint("backfill >= 0", name=op.f("ck_subscriptions_backfill")),
        _connection_fk("subscriptions"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
        sa.UniqueConstraint(
            "connection_id", "name", name=op.f("uq_subscriptions_connection_id_name")
        ),
    )
    op.create_index(
        op.f("ix_subscriptions_connection_id"), "subscriptions", ["connection_id"], unique=False
    )
    op.create_table(
        "watermarks",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("stream", sa.String(length=16), nullable=False),
        sa.Column("last_id", sa.Text(), nullable=True),
        _timestamp("last_date"),
        _timestamp("updated_at"),
        _one_of("ck_watermarks_stream", "stream", ("history", "rooms", "participants")),
        _connection_fk("watermarks"),
        sa.PrimaryKeyConstraint("connection_id", "room_id", "stream", name=op.f("pk_watermarks")),
    )
    op.create_table(
        "known_rooms",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("privacy", sa.String(length=16), nullable=False),
        sa.Column("is_archived", sa.Boolean(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        _timestamp("updated_at"),
        _connection_fk("known_rooms"),
        sa.PrimaryKeyConstraint("connection_id", "room_id", name=op.f("pk_known_rooms")),
    )
    op.create_table(
        "known_participants",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("room_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("mention_name", sa.Text(), nullable=False),
        _timestamp("updated_at"),
        _connection_fk("known_participants"),
        sa.PrimaryKeyConstraint(
            "connection_id", "room_id", "user_id", name=op.f("pk_known_participants")
        ),
    )
    op.create_table(
        "outbox_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("subscription_id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        _json("payload"),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        _timestamp("created_at"),
        _timestamp("dispatched_at", nullable=True),
        _timestamp("delivered_at", nullable=True),
        _timestamp("next_attempt_at", nullable=True),
        _one_of("ck_outbox_events_state", "state", ("pending", "dispatched", "delivered", "dead")),
        _connection_fk("outbox_events"),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscriptions.id"],
            name=op.f("fk_outbox_events_subscription_id_subscriptions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_events")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_outbox_events_idempotency_key")),
    )
    for name, columns in (
        ("ix_outbox_events_connection_id", ["connection_id"]),
        ("ix_outbox_events_subscription_id", ["subscription_id"]),
        ("ix_outbox_events_state_created_at", ["state", "created_at"]),
        ("ix_outbox_events_state_dispatched_at", ["state", "dispatched_at"]),
    ):
        op.create_index(op.f(name), "outbox_events", columns, unique=False)


def downgrade() -> None:
    for table in (
        "outbox_events",
        "known_participants",
        "known_rooms",
        "watermarks",
        "subscriptions",
        "connections",
    ):
        op.drop_table(table)
