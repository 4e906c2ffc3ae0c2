"""Connections no longer hold their last poll: connection_health does; HipChat's budget is
read from the call budget itself.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29

``connections.last_poll_at`` and ``last_poll_status`` are copied into ``connection_health``
(for connections that have no health row yet), then dropped: a poll's bookkeeping must not
touch the configuration table, whose ``updated_at`` beat follows.
``connection_health.ratelimit`` is dropped: the call budget keeps HipChat's last word
(``SlidingLogBudget.usage``), which ``status`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "INSERT INTO connection_health (connection_id, last_poll_at, status, rooms, ratelimit) "
        "SELECT id, last_poll_at, last_poll_status, '{}', '{}' FROM connections "
        "WHERE last_poll_at IS NOT NULL "
        "AND id NOT IN (SELECT connection_id FROM connection_health)"
    )
    with op.batch_alter_table("connections") as batch:
        batch.drop_column("last_poll_status")
        batch.drop_column("last_poll_at")
    with op.batch_alter_table("connection_health") as batch:
        batch.drop_column("ratelimit")


def downgrade() -> None:
    with op.batch_alter_table("connection_health") as batch:
        batch.add_column(sa.Column("ratelimit", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("last_poll_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_poll_status", sa.Text(), nullable=True))
