"""Every conversation remembers the assistant (chain) that answers it (NULL: the default one),
and every turn the tool calls and results of its reply (NULL: none).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("assistant", sa.String(32), nullable=True))
    with op.batch_alter_table("turns") as batch:
        batch.add_column(sa.Column("exchanged", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("turns") as batch:
        batch.drop_column("exchanged")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("assistant")
