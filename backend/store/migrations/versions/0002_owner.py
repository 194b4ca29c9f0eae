"""Every conversation belongs to a user ('' is the anonymous user of CHAT_AUTH=none).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("owner", sa.String(255), nullable=False, server_default=""))
    op.create_index("ix_conversations_owner_updated", "conversations", ["owner", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_conversations_owner_updated", "conversations")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("owner")
