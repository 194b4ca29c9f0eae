"""The database: its tables, opening an engine for a URL, and bringing the schema up to date.

Any SQLAlchemy async URL works; the default is one SQLite file that needs no set-up. The
schema is owned by the Alembic migrations in `backend/store/migrations`, applied at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# PostgreSQL advisory lock key under which one worker at a time migrates (any constant).
MIGRATION_LOCK = 0x63686174
ID_LENGTH = 32

metadata = MetaData()

conversations = Table(
    "conversations",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("title", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, index=True),
    Column("last_seq", BigInteger, nullable=False),
    Column("turn_count", Integer, nullable=False),
    # The user it belongs to; '' is the anonymous user (CHAT_AUTH=none).
    Column("owner", String(255), nullable=False, server_default=""),
    # The assistant that answers it; NULL: the server's default.
    Column("assistant", String(32), nullable=True),
    # Whether its owner named it: then its title is theirs, never the first question's again.
    Column("named", Boolean, nullable=False, server_default=false()),
    Index("ix_conversations_owner_updated", "owner", "updated_at"),
)

turns = Table(
    "turns",
    metadata,
    Column(
        "conversation_id",
        String(ID_LENGTH),
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("position", Integer, primary_key=True),
    Column("question", Text, nullable=False),
    Column("asked_at", DateTime(timezone=True), nullable=False),
    Column("echo_seq", BigInteger, nullable=False),
    # The reply's frames other than its text (`start`, `info`, `error`, `end`), with their seq.
    Column("events", JSON, nullable=False),
    Column("text", Text, nullable=False),
    Column("text_base", BigInteger, nullable=True),
    # NULL while the reply streams.
    Column("status", String(16), nullable=True),
    # The tool calls and results of the reply (see `TurnRecord.exchanged`); NULL: none.
    Column("exchanged", JSON, nullable=True),
    # The webhook endpoint the question asked to be called when the reply ends; NULL: none.
    Column("webhook", String(64), nullable=True),
    # For an edited question: the `seq` its earlier text was said back with; NULL: not edited.
    Column("replaces", BigInteger, nullable=True),
)

# Webhook events waiting to be delivered, delivered, or given up on (backend/webhooks/).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # The `webhook-id` of every attempt: the same on each retry, so receivers drop repeats.
    Column("id", String(64), primary_key=True),
    Column("endpoint", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("conversation_id", String(ID_LENGTH), nullable=False),
    Column("owner", String(255), nullable=False),
    # The body, as sent and signed: the same bytes on every attempt.
    Column("payload", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True),
    Column("status", String(16), nullable=False),  # pending, delivered, failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    # While a worker attempts it: until when the others leave it alone.
    Column("claimed_until", DateTime(timezone=True), nullable=True),
    Column("last_attempt_at", DateTime(timezone=True), nullable=True),
    Column("last_response", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)


# The full-text search over titles, questions and replies (migration 0006): FTS5 tables kept
# by triggers on SQLite, GIN indexes of `to_tsvector` on PostgreSQL. The migrations own them;
# the tables above do not describe them.
SEARCH_TABLES = ("search_titles", "search_turns")
SEARCH_INDEXES = ("ix_conversations_search", "ix_turns_search")


def described(_object: object, name: str | None, kind: str, reflected: bool, _: object) -> bool:
    """Whether Alembic's comparison should look at an object: not at the search's own."""
    if kind == "table" and reflected and name is not None:
        return not name.startswith(SEARCH_TABLES)
    return not (kind == "index" and name in SEARCH_INDEXES)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers go on while the writer commits; NORMAL syncs at checkpoints, which
    # loses nothing on a process crash (only on power loss, the last commits).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; a SQLite file's folder is created if missing."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # Pooled connections are not pinged as they are taken (three round trips each time with
    # asyncpg): one found closed is replaced, with the whole pool (see `SqlStore._retried`).
    return create_async_engine(url)


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every migration the database has not had yet."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Workers starting together: the others wait, then find nothing left to do.
            await connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
            )
        await connection.run_sync(_upgrade)
