"""Connection health, the attempt log of events, include_own, case-insensitive names.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

* ``connection_health``: one row per connection, written by the polls (batched): when it was
  last polled and last polled without a failure, its status line, the rooms failing alone
  with their error and since when, what HipChat last said about the budget.
* ``subscriptions.include_own``: fire on the connection's own posts too (default: no).
* ``outbox_events.attempt_log``: every delivery attempt, for ``events show``.
* ``connections.name_key``, the name in lower case, unique: names differ in more than case.

Self-contained on purpose, like 0001.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "connection_health",
        sa.Column("connection_id", sa.Integer(), nullable=False),
        sa.Column("last_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_ok_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rooms", sa.JSON(), nullable=False),
        sa.Column("ratelimit", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["connection_id"],
            ["connections.id"],
            name=op.f("fk_connection_health_connection_id_connections"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_connection_health")),
    )
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(
            sa.Column("include_own", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("outbox_events") as batch:
        batch.add_column(sa.Column("attempt_log", sa.JSON(), nullable=True))
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("name_key", sa.String(length=64), nullable=True))
    op.execute("UPDATE connections SET name_key = lower(name)")
    with op.batch_alter_table("connections") as batch:
        batch.alter_column("name_key", existing_type=sa.String(length=64), nullable=False)
        batch.create_unique_constraint(op.f("uq_connections_name_key"), ["name_key"])


def downgrade() -> None:
    with op.batch_alter_table("connections") as batch:
        batch.drop_constraint(op.f("uq_connections_name_key"), type_="unique")
        batch.drop_column("name_key")
    with op.batch_alter_table("outbox_events") as batch:
        batch.drop_column("attempt_log")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("include_own")
    op.drop_table("connection_health")
