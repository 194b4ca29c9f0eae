"""Writing conversations to the store off the token path, in one transaction a second.

Tokens only append to lists in memory. This writer wakes every `interval` seconds, takes a
snapshot of every conversation that changed or is streaming, and saves them together, so a
crash loses at most about `interval` seconds of a reply's text. (A reply that ends is stored on
the next tick too: a batch a second costs less than a transaction per reply.) Scaled out, a
reply in flight is whole in its Redis stream, and is stored only as it ends (see
`Relay.keeps_live_turn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from sqlalchemy.exc import InterfaceError, OperationalError

from backend.store.records import ConversationRecord, DeliveryRecord
from backend.store.sql import Store

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0


def unreachable(failure: BaseException) -> bool:
    """Whether `failure` is the store being out of reach (every save would fail alike), rather
    than one it refused for what it was given."""
    if isinstance(failure, OperationalError | InterfaceError):
        return True
    return isinstance(failure, OSError) or not isinstance(failure, Exception)


class Snapshotting(Protocol):
    """A conversation as the writer sees it."""

    @property
    def id(self) -> str:
        """Its id."""

    def snapshot(self) -> ConversationRecord | None:
        """Its row and the turns changed since the last snapshot; None if nothing to store."""

    def unsaved(self, record: ConversationRecord) -> None:
        """A snapshot could not be written: take its turns as changed again."""


class WriteBehind:
    """Saves changed conversations in batches; one per app."""

    def __init__(self, store: Store, interval: float = FLUSH_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._changed: dict[str, Snapshotting] = {}
        self._streaming: dict[str, Snapshotting] = {}
        self._saving: set[str] = set()
        # Saves and deletes one at a time, so a delete is never undone by a save in flight.
        self._lock = asyncio.Lock()
        self._flushed = asyncio.Event()
        self._soon = asyncio.Event()
        # Called once a save stored webhook deliveries: they can be attempted.
        self.on_deliveries: Callable[[], None] | None = None

    def changed(self, conversation: Snapshotting) -> None:
        """`conversation` has something to store, on the next tick."""
        self._changed[conversation.id] = conversation

    def streaming(self, conversation: Snapshotting, on: bool) -> None:
        """While on, `conversation` is stored every tick (its reply text grows)."""
        if on:
            self._streaming[conversation.id] = conversation
        else:
            self._streaming.pop(conversation.id, None)
            self.changed(conversation)

    def soon(self) -> None:
        """Store what changed now rather than at the next tick (a reply ended that webhooks
        are waiting to hear of)."""
        self._soon.set()

    def pending(self, conversation_id: str) -> bool:
        """Whether a conversation has changes not yet stored."""
        return (
            conversation_id in self._changed
            or conversation_id in self._streaming
            or conversation_id in self._saving
        )

    async def stored(self, conversation_id: str) -> None:
        """Return once nothing of a conversation waits to be stored."""
        while self.pending(conversation_id):
            await self._flushed.wait()

    async def run(self) -> None:
        """Flush every `interval` seconds until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._soon.wait(), self.interval)
            self._soon.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("could not store conversations; will retry")

    async def flush(self) -> None:
        """Store every pending change now."""
        async with self._lock:
            batch = {**self._streaming, **self._changed}
            self._changed.clear()
            records = [
                (conversation, record)
                for conversation in batch.values()
                if (record := conversation.snapshot()) is not None
            ]
            if records:
                self._saving = {conversation.id for conversation, _ in records}
                try:
                    await self._save(records)
                finally:
                    self._saving = set()
            flushed, self._flushed = self._flushed, asyncio.Event()
            flushed.set()

    async def _save(self, records: list[tuple[Snapshotting, ConversationRecord]]) -> None:
        """Save `records` together; if the store refuses one of them (not an outage), save
        them one by one, so that one conversation it cannot take does not hold up the rest."""
        try:
            await self.store.save([record for _, record in records])
            self._stored_deliveries(record for _, record in records)
            return
        except BaseException as failure:
            if len(records) == 1 or unreachable(failure):
                self._unsaved(records)
                raise
            batch_failure = failure
        refused: list[str] = []
        for conversation, record in records:
            try:
                await self.store.save([record])
                self._stored_deliveries([record])
            except Exception:
                log.exception("could not store conversation %s; will retry", conversation.id)
                self._unsaved([(conversation, record)])
                refused.append(conversation.id)
        if refused and len(refused) == len(records):
            raise batch_failure

    def _stored_deliveries(self, records: Iterable[ConversationRecord]) -> None:
        if self.on_deliveries is not None and any(record.deliveries for record in records):
            self.on_deliveries()

    def _unsaved(self, records: list[tuple[Snapshotting, ConversationRecord]]) -> None:
        for conversation, record in records:
            conversation.unsaved(record)
            self._changed.setdefault(conversation.id, conversation)

    async def delete(self, conversation_id: str, deliveries: Sequence[DeliveryRecord] = ()) -> bool:
        """Forget a conversation's pending changes and remove it from the store, storing the
        webhook `deliveries` that tell of it in the same transaction."""
        async with self._lock:
            self._changed.pop(conversation_id, None)
            self._streaming.pop(conversation_id, None)
            removed = await self.store.delete(conversation_id, deliveries)
        if deliveries and self.on_deliveries is not None:
            self.on_deliveries()
        return removed
