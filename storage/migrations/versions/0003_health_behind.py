"""Connection health: the streams a poll could not reach.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

``connection_health.behind`` lists the streams (``"history:10001"``...) the last poll did not
reach before the budget ran out; the next poll reads them first, so that a budget too small
for a whole poll still reaches every room in turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("connection_health") as batch:
        batch.add_column(sa.Column("behind", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("connection_health") as batch:
        batch.drop_column("behind")
