"""Conversations can be searched by the words of their titles, questions and replies, and
renamed by their owners.

SQLite: two FTS5 tables with the `turns` and `conversations` rows as their content, kept by
triggers. Only finished turns are indexed, so a streaming reply's rewrites cost nothing here.
PostgreSQL: GIN indexes of the same words (`to_tsvector('simple', ...)`), the turns' partial
to finished ones. `backend/store/search.py` asks them.

A later migration that rebuilds `turns` or `conversations` on SQLite (a batch alter that copies
the table) drops their triggers and must create them again.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SQLITE = [
    "CREATE VIRTUAL TABLE search_turns USING fts5(question, text, content='turns', "
    "content_rowid='rowid', tokenize='unicode61 remove_diacritics 0')",
    "CREATE VIRTUAL TABLE search_titles USING fts5(title, content='conversations', "
    "content_rowid='rowid', tokenize='unicode61 remove_diacritics 0')",
    "INSERT INTO search_turns (rowid, question, text) "
    "SELECT rowid, question, text FROM turns WHERE status IS NOT NULL",
    "INSERT INTO search_titles (rowid, title) SELECT rowid, title FROM conversations",
    # A turn is indexed once it has ended; a regenerated one leaves the index until it ends.
    "CREATE TRIGGER search_turns_insert AFTER INSERT ON turns WHEN new.status IS NOT NULL "
    "BEGIN INSERT INTO search_turns (rowid, question, text) "
    "VALUES (new.rowid, new.question, new.text); END",
    "CREATE TRIGGER search_turns_delete AFTER DELETE ON turns WHEN old.status IS NOT NULL "
    "BEGIN INSERT INTO search_turns (search_turns, rowid, question, text) "
    "VALUES ('delete', old.rowid, old.question, old.text); END",
    "CREATE TRIGGER search_turns_unindex AFTER UPDATE ON turns WHEN old.status IS NOT NULL "
    "AND (new.status IS NULL OR old.question IS NOT new.question OR old.text IS NOT new.text) "
    "BEGIN INSERT INTO search_turns (search_turns, rowid, question, text) "
    "VALUES ('delete', old.rowid, old.question, old.text); END",
    "CREATE TRIGGER search_turns_index AFTER UPDATE ON turns WHEN new.status IS NOT NULL "
    "AND (old.status IS NULL OR old.question IS NOT new.question OR old.text IS NOT new.text) "
    "BEGIN INSERT INTO search_turns (rowid, question, text) "
    "VALUES (new.rowid, new.question, new.text); END",
    "CREATE TRIGGER search_titles_insert AFTER INSERT ON conversations "
    "BEGIN INSERT INTO search_titles (rowid, title) VALUES (new.rowid, new.title); END",
    "CREATE TRIGGER search_titles_delete AFTER DELETE ON conversations "
    "BEGIN INSERT INTO search_titles (search_titles, rowid, title) "
    "VALUES ('delete', old.rowid, old.title); END",
    "CREATE TRIGGER search_titles_update AFTER UPDATE OF title ON conversations "
    "WHEN old.title IS NOT new.title "
    "BEGIN INSERT INTO search_titles (search_titles, rowid, title) "
    "VALUES ('delete', old.rowid, old.title); "
    "INSERT INTO search_titles (rowid, title) VALUES (new.rowid, new.title); END",
]

POSTGRESQL = [
    "CREATE INDEX ix_conversations_search ON conversations "
    "USING gin (to_tsvector('simple', title))",
    "CREATE INDEX ix_turns_search ON turns "
    "USING gin (to_tsvector('simple', question || ' ' || text)) WHERE status IS NOT NULL",
]


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("named", sa.Boolean, nullable=False, server_default=sa.false()))
    dialect = op.get_bind().dialect.name
    for statement in SQLITE if dialect == "sqlite" else POSTGRESQL:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("turns_insert", "turns_delete", "turns_unindex", "turns_index"):
            op.execute(f"DROP TRIGGER search_{name}")
        for name in ("titles_insert", "titles_delete", "titles_update"):
            op.execute(f"DROP TRIGGER search_{name}")
        op.execute("DROP TABLE search_turns")
        op.execute("DROP TABLE search_titles")
    else:
        op.execute("DROP INDEX ix_turns_search")
        op.execute("DROP INDEX ix_conversations_search")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("named")
