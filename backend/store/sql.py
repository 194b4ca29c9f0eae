"""Where conversations are kept: the `Store` interface and its SQL implementation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Insert, Select, case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from backend.store.db import conversations, create_engine, migrate, turns, webhook_deliveries
from backend.store.records import (
    ConversationRecord,
    ConversationSummary,
    DeliveryRecord,
    Found,
    TurnRecord,
    carryable,
)
from backend.store.search import matching, words_of
from schemas import ChatResponse, EndStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

# A process killed mid-reply may have sent frames it never stored. Numbering of a conversation
# found that way goes on this far above what was stored, past anything a client can have seen.
CRASH_GAP = 1_000_000


class Store(Protocol):
    """Conversations at rest. Implementations must be safe to call from many tasks at once."""

    async def start(self, running: Running | None = None) -> None:
        """Make the store ready: schema up to date, replies cut off by a crash closed (but
        not those `running` says another worker still runs, or will end)."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """Return once the store answers; raise if it cannot be reached."""

    async def save(self, records: Sequence[ConversationRecord]) -> None:
        """Write each conversation's row, the turns and the webhook deliveries it carries, in
        one transaction."""

    async def load(self, conversation_id: str) -> ConversationRecord | None:
        """A conversation with all its turns, or None."""

    async def page(
        self, owner: str, limit: int, offset: int, search: str = ""
    ) -> list[ConversationSummary]:
        """`owner`'s conversations, most recently updated first; with `search`, those whose
        title or one of whose finished turns has words starting with each of its words."""

    async def rename(
        self, conversation_id: str, owner: str, title: str
    ) -> ConversationSummary | None:
        """Give `owner`'s conversation a title of theirs, kept from then on; None if there is
        no such conversation."""

    async def delete(self, conversation_id: str, deliveries: Sequence[DeliveryRecord] = ()) -> bool:
        """Remove a conversation and its turns, storing `deliveries` in the same transaction;
        False if there was none."""

    async def search(self, owner: str, text: str, limit: int) -> list[Found]:
        """`owner`'s finished turns whose question or reply holds `text` (any case), newest
        first."""


def aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time stored is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _turn_row(conversation_id: str, turn: TurnRecord) -> dict[str, Any]:
    # Questions and reply text are checked as they arrive; an event's message (an upstream
    # error's own words, say) is made safe here, so no row can fail to be written for it.
    events = [event.model_dump(exclude_none=True) for event in turn.events]
    for event in events:
        event["message"] = carryable(event["message"])
    return {
        "conversation_id": conversation_id,
        "position": turn.position,
        "question": carryable(turn.question),
        "asked_at": turn.asked_at,
        "echo_seq": turn.echo_seq,
        "events": events,
        "text": carryable(turn.text),
        "text_base": turn.text_base,
        "status": turn.status,
        "exchanged": turn.exchanged or None,
        "webhook": turn.webhook,
        "replaces": turn.replaces,
    }


def _delivery_row(delivery: DeliveryRecord) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "endpoint": delivery.endpoint,
        "event": delivery.event,
        "conversation_id": delivery.conversation_id,
        "owner": delivery.owner,
        "payload": delivery.payload,
        "created_at": delivery.created_at,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": delivery.created_at,
    }


def _turn_from(row: Any) -> TurnRecord:
    return TurnRecord(
        position=row.position,
        question=row.question,
        echo_seq=row.echo_seq,
        asked_at=aware(row.asked_at),
        events=[ChatResponse.model_validate(event) for event in row.events],
        parts=[row.text] if row.text else [],
        text_base=row.text_base,
        status=cast(EndStatus | None, row.status),
        exchanged=row.exchanged or [],
        webhook=row.webhook,
        replaces=row.replaces,
    )


def _summary_from(row: Any) -> ConversationSummary:
    return ConversationSummary(
        id=row.id,
        title=row.title,
        created_at=aware(row.created_at),
        updated_at=aware(row.updated_at),
        turn_count=row.turn_count,
        assistant=row.assistant,
    )


# Whether another worker runs a conversation's turn, or will end it from its stream: then a
# turn the store has as streaming was not cut off.
Running = Callable[[str], Awaitable[bool]]

# What a reply cut off by a crash tells webhooks: its conversation's id, owner and assistant,
# and the turn as closed; the deliveries to store with it.
CutOff = Callable[[str, str, str | None, TurnRecord], list[DeliveryRecord]]


class SqlStore:
    """A `Store` on any SQLAlchemy async engine: SQLite by default, PostgreSQL alike."""

    def __init__(self, url: str, cut_off: CutOff | None = None) -> None:
        self.engine: AsyncEngine = create_engine(url)
        dialect = self.engine.dialect.name
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"Unsupported database {dialect!r}: use SQLite or PostgreSQL.")
        self._insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        self._conversation_upsert = self._conversation_save()
        self._turn_upsert = self._upsert(turns, ["conversation_id", "position"])
        self._delivery_insert = self._insert(webhook_deliveries).on_conflict_do_nothing(
            index_elements=["id"]
        )
        self.cut_off = cut_off

    async def start(self, running: Running | None = None) -> None:
        await migrate(self.engine)
        closed = await self._close_cut_off_replies(running)
        if closed:
            log.warning("%d replies were cut off by a crash; stored as interrupted", closed)

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> None:
        await self._retried(self._ping)

    async def _ping(self) -> None:
        async with self._reading() as connection:
            await connection.execute(select(1))

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for one read statement: no transaction around it, so the statement is
        the only round trip (a `BEGIN` and a `ROLLBACK` would be two more)."""
        async with self.engine.connect() as connection:
            yield await connection.execution_options(isolation_level="AUTOCOMMIT")

    async def _retried(self, work: Callable[[], Awaitable[T]]) -> T:
        """`work()`, once more if it failed on a connection the database had closed (it
        restarted): pooled connections are not pinged before use, which would cost round
        trips on every request, and a connection found dead has the whole pool replaced."""
        try:
            return await work()
        except DBAPIError as failure:
            if not failure.connection_invalidated:
                raise
            log.info("a pooled database connection was closed; trying again on a new one")
            return await work()

    def _upsert(self, table: Any, keys: Sequence[str]) -> Insert:
        """Insert, or update every column but `keys` where a row with those keys exists."""
        statement = self._insert(table)
        changes = {
            column.name: statement.excluded[column.name]
            for column in table.columns
            if column.name not in keys
        }
        return statement.on_conflict_do_update(index_elements=list(keys), set_=changes)

    def _conversation_save(self) -> Insert:
        """Insert a conversation, or update all of it but a title its owner gave it."""
        statement = self._insert(conversations)
        changes: dict[str, Any] = {
            column.name: statement.excluded[column.name]
            for column in conversations.columns
            if column.name not in ("id", "named")
        }
        changes["title"] = case(
            (conversations.c.named, conversations.c.title), else_=statement.excluded.title
        )
        return statement.on_conflict_do_update(index_elements=["id"], set_=changes)

    async def save(self, records: Sequence[ConversationRecord]) -> None:
        if records:
            # Written whole or not at all, and the same rows again: safe to try twice.
            await self._retried(lambda: self._save(records))

    async def _save(self, records: Sequence[ConversationRecord]) -> None:
        rows = [
            {
                "id": record.id,
                "title": carryable(record.title),
                "created_at": record.created_at,
                "updated_at": record.updated_at,
                "last_seq": record.last_seq,
                "turn_count": record.turn_count,
                "owner": record.owner,
                "assistant": record.assistant,
            }
            for record in records
        ]
        turn_rows = [_turn_row(record.id, turn) for record in records for turn in record.turns]
        delivery_rows = [
            _delivery_row(delivery) for record in records for delivery in record.deliveries
        ]
        # One statement for all conversations, one for all turns and one for all deliveries,
        # however many there are.
        async with self.engine.begin() as connection:
            await connection.execute(self._conversation_upsert, rows)
            if turn_rows:
                await connection.execute(self._turn_upsert, turn_rows)
            if delivery_rows:
                await connection.execute(self._delivery_insert, delivery_rows)

    async def load(self, conversation_id: str) -> ConversationRecord | None:
        return await self._retried(lambda: self._load(conversation_id))

    async def _load(self, conversation_id: str) -> ConversationRecord | None:
        # One statement, one round trip: the conversation's row beside each of its turns.
        query = (
            select(conversations, turns)
            .select_from(
                conversations.outerjoin(turns, turns.c.conversation_id == conversations.c.id)
            )
            .where(conversations.c.id == conversation_id)
            .order_by(turns.c.position)
        )
        async with self._reading() as connection:
            rows = (await connection.execute(query)).all()
        if not rows:
            return None
        row = rows[0]
        return ConversationRecord(
            id=row.id,
            title=row.title,
            created_at=aware(row.created_at),
            updated_at=aware(row.updated_at),
            last_seq=row.last_seq,
            turn_count=row.turn_count,
            turns=[_turn_from(turn) for turn in rows if turn.position is not None],
            owner=row.owner,
            assistant=row.assistant,
        )

    async def page(
        self, owner: str, limit: int, offset: int, search: str = ""
    ) -> list[ConversationSummary]:
        query = self.page_query(owner, limit, offset, search)
        if query is None:
            return []
        return await self._retried(lambda: self._page(query))

    async def _page(self, query: Select[Any]) -> list[ConversationSummary]:
        async with self._reading() as connection:
            rows = await connection.execute(query)
            return [_summary_from(row) for row in rows]

    def page_query(
        self, owner: str, limit: int, offset: int, search: str = ""
    ) -> Select[Any] | None:
        """The query `page` runs; None for a search without a word (nothing matches it)."""
        query = select(conversations).where(conversations.c.owner == owner)
        if search.strip():
            words = words_of(search)
            if not words:
                return None
            query = query.where(matching(self.engine.dialect.name, words))
        return (
            query.order_by(conversations.c.updated_at.desc(), conversations.c.id)
            .limit(limit)
            .offset(offset)
        )

    async def rename(
        self, conversation_id: str, owner: str, title: str
    ) -> ConversationSummary | None:
        statement = (
            update(conversations)
            .where(conversations.c.id == conversation_id, conversations.c.owner == owner)
            .values(title=carryable(title), named=True)
            .returning(*conversations.columns)
        )
        async with self.engine.begin() as connection:
            row = (await connection.execute(statement)).first()
            return None if row is None else _summary_from(row)

    async def search(self, owner: str, text: str, limit: int) -> list[Found]:
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = f"%{escaped}%"
        query = (
            select(
                turns.c.conversation_id,
                conversations.c.title,
                turns.c.question,
                turns.c.text,
                turns.c.asked_at,
            )
            .join(conversations, conversations.c.id == turns.c.conversation_id)
            .where(conversations.c.owner == owner, turns.c.status.is_not(None))
            .where(
                turns.c.question.ilike(pattern, escape="\\")
                | turns.c.text.ilike(pattern, escape="\\")
            )
            .order_by(turns.c.asked_at.desc())
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            rows = await connection.execute(query)
            return [
                Found(row.conversation_id, row.title, row.question, row.text, aware(row.asked_at))
                for row in rows
            ]

    async def delete(self, conversation_id: str, deliveries: Sequence[DeliveryRecord] = ()) -> bool:
        async with self.engine.begin() as connection:
            if deliveries:
                await connection.execute(
                    self._delivery_insert, [_delivery_row(delivery) for delivery in deliveries]
                )
            await connection.execute(
                delete(turns).where(turns.c.conversation_id == conversation_id)
            )
            result = await connection.execute(
                delete(conversations).where(conversations.c.id == conversation_id)
            )
            return bool(result.rowcount)

    async def _close_cut_off_replies(self, running: Running | None) -> int:
        """Store replies left streaming by a process that died as `interrupted`."""
        async with self.engine.begin() as connection:
            rows = (await connection.execute(select(turns).where(turns.c.status.is_(None)))).all()
            closed = 0
            for row in rows:
                if running is not None and await running(row.conversation_id):
                    continue
                await self._close_cut_off(connection, _turn_from(row), row.conversation_id)
                closed += 1
            return closed

    async def _close_cut_off(
        self, connection: AsyncConnection, turn: TurnRecord, conversation_id: str
    ) -> None:
        conversation = (
            await connection.execute(
                select(
                    conversations.c.last_seq, conversations.c.owner, conversations.c.assistant
                ).where(conversations.c.id == conversation_id)
            )
        ).first()
        last_seq = conversation.last_seq if conversation else 0
        seq = max(int(last_seq or 0), turn.last_seq) + CRASH_GAP
        end = ChatResponse.bot("end", status="interrupted")
        end.seq = seq
        turn.events.append(end)
        turn.status = "interrupted"
        await connection.execute(
            update(turns)
            .where(turns.c.conversation_id == conversation_id, turns.c.position == turn.position)
            .values(events=_turn_row(conversation_id, turn)["events"], status=turn.status)
        )
        await connection.execute(
            update(conversations).where(conversations.c.id == conversation_id).values(last_seq=seq)
        )
        if self.cut_off is not None and conversation is not None:
            told = self.cut_off(conversation_id, conversation.owner, conversation.assistant, turn)
            if told:
                await connection.execute(
                    self._delivery_insert, [_delivery_row(delivery) for delivery in told]
                )
