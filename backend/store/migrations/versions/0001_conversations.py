"""Conversations and their turns.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("turn_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_conversations_updated_at", "conversations", ["updated_at"])
    op.create_table(
        "turns",
        sa.Column(
            "conversation_id",
            sa.String(32),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("question", sa.Text, nullable=False),
        sa.Column("asked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("echo_seq", sa.BigInteger, nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("text_base", sa.BigInteger, nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("turns")
    op.drop_index("ix_conversations_updated_at", "conversations")
    op.drop_table("conversations")
