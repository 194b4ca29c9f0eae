"""Webhook deliveries at rest: claimed by one worker at a time, then marked delivered,
due again, or failed; listed and redelivered for admins.

A claim is one statement (`UPDATE ... WHERE id IN (SELECT ... LIMIT n) RETURNING`): SQLite runs
it under its one writer lock, PostgreSQL skips the rows another worker is claiming (`FOR UPDATE
SKIP LOCKED`). A claim holds for a lease: a worker that dies mid-attempt leaves its deliveries
to be claimed again when the lease runs out, which is what makes delivery at least once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.store.db import webhook_deliveries as table
from backend.store.records import now
from backend.store.sql import aware
from schemas.webhooks import Delivery


@dataclass(frozen=True)
class Claimed:
    """A delivery a worker has claimed, to attempt now."""

    id: str
    endpoint: str
    event: str
    payload: str
    attempts: int  # this attempt included
    created_at: datetime


def _maybe(moment: datetime | None) -> datetime | None:
    return None if moment is None else aware(moment)


class DeliveryQueue:
    """The deliveries table of a store's database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._skip_locked = engine.dialect.name == "postgresql"

    async def claim(self, limit: int, lease: float) -> list[Claimed]:
        """Up to `limit` deliveries that are due and not claimed, claimed for `lease` seconds
        and counted as attempted."""
        moment = now()
        due = (
            select(table.c.id)
            .where(
                table.c.status == "pending",
                table.c.next_attempt_at <= moment,
                or_(table.c.claimed_until.is_(None), table.c.claimed_until < moment),
            )
            .order_by(table.c.next_attempt_at)
            .limit(limit)
        )
        if self._skip_locked:
            due = due.with_for_update(skip_locked=True)
        statement = (
            update(table)
            .where(table.c.id.in_(due))
            .values(
                claimed_until=moment + timedelta(seconds=lease),
                attempts=table.c.attempts + 1,
                last_attempt_at=moment,
            )
            .returning(
                table.c.id,
                table.c.endpoint,
                table.c.event,
                table.c.payload,
                table.c.attempts,
                table.c.created_at,
            )
        )
        async with self.engine.begin() as connection:
            rows = (await connection.execute(statement)).all()
        return [
            Claimed(
                row.id, row.endpoint, row.event, row.payload, row.attempts, aware(row.created_at)
            )
            for row in rows
        ]

    async def delivered(self, delivery_id: str, response: int) -> None:
        """The receiver took it."""
        await self._set(
            delivery_id,
            status="delivered",
            delivered_at=now(),
            last_response=response,
            last_error=None,
            next_attempt_at=None,
        )

    async def again(self, delivery_id: str, at: datetime, response: int | None, error: str) -> None:
        """The attempt failed; try again at `at`."""
        await self._set(delivery_id, next_attempt_at=at, last_response=response, last_error=error)

    async def failed(self, delivery_id: str, response: int | None, error: str) -> None:
        """The attempt failed, and no other will be made unless an admin asks."""
        await self._set(
            delivery_id,
            status="failed",
            next_attempt_at=None,
            last_response=response,
            last_error=error,
        )

    async def _set(self, delivery_id: str, **values: Any) -> None:
        async with self.engine.begin() as connection:
            await connection.execute(
                update(table).where(table.c.id == delivery_id).values(claimed_until=None, **values)
            )

    async def prune(self, before: datetime, limit: int = 1000) -> int:
        """Delete up to `limit` finished deliveries (delivered or failed) last attempted, or
        made, before `before`; how many were deleted."""
        finished = (
            select(table.c.id)
            .where(
                table.c.status.in_(("delivered", "failed")),
                func.coalesce(table.c.last_attempt_at, table.c.created_at) < before,
            )
            .limit(limit)
        )
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(table).where(table.c.id.in_(finished)))
        return int(result.rowcount or 0)

    async def release(self, delivery_ids: list[str]) -> None:
        """Give back claims whose attempts were cancelled: they are due again at once."""
        if delivery_ids:
            async with self.engine.begin() as connection:
                await connection.execute(
                    update(table)
                    .where(table.c.id.in_(delivery_ids), table.c.status == "pending")
                    .values(claimed_until=None)
                )

    async def next_due(self) -> datetime | None:
        """When the soonest pending delivery can be claimed; None if none is pending."""
        ready = case(
            (table.c.claimed_until > table.c.next_attempt_at, table.c.claimed_until),
            else_=table.c.next_attempt_at,
        )
        async with self.engine.connect() as connection:
            soonest = await connection.scalar(
                select(func.min(ready)).where(table.c.status == "pending")
            )
        if isinstance(soonest, str):  # SQLite hands an expression's datetime back as text
            soonest = datetime.fromisoformat(soonest)
        return _maybe(soonest)

    async def recent(
        self, limit: int, status: str | None = None, endpoint: str | None = None
    ) -> list[Delivery]:
        """The latest deliveries first, optionally of one status or endpoint."""
        query = select(table).order_by(table.c.created_at.desc(), table.c.id).limit(limit)
        if status is not None:
            query = query.where(table.c.status == status)
        if endpoint is not None:
            query = query.where(table.c.endpoint == endpoint)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [
            Delivery(
                id=row.id,
                endpoint=row.endpoint,
                event=row.event,
                conversation=row.conversation_id,
                status=row.status,
                attempts=row.attempts,
                created=aware(row.created_at),
                last_attempt=_maybe(row.last_attempt_at),
                last_response=row.last_response,
                last_error=row.last_error,
                next_attempt=_maybe(row.next_attempt_at) if row.status == "pending" else None,
                delivered=_maybe(row.delivered_at),
            )
            for row in rows
        ]

    async def redeliver(self, delivery_id: str) -> bool:
        """Attempt a delivery again now, whatever became of it; False if there is none."""
        async with self.engine.begin() as connection:
            result = await connection.execute(
                update(table)
                .where(table.c.id == delivery_id)
                .values(status="pending", next_attempt_at=now(), claimed_until=None)
            )
        return bool(result.rowcount)
