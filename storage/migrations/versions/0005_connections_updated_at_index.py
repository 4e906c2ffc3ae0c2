"""An index on connections.updated_at.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Beat reads the connections changed since its last look every few seconds
(``storage.connections.connection_changes``): with the index that is a range scan of the few
changed rows, not a scan of every connection.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_connections_updated_at", "connections", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_connections_updated_at", table_name="connections")
