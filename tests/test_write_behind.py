"""The writer that stores conversations off the token path: one conversation the store refuses
does not hold up the others, and an outage keeps every change for the next try."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from sqlalchemy.exc import OperationalError

from backend.store.records import ConversationRecord
from backend.store.sql import SqlStore
from backend.store.write_behind import WriteBehind
from tests.harness import temp_database
from tests.test_store import conversation, turn


class Picky(SqlStore):
    """A real store that refuses any batch holding `refused`, or all of them while `down`."""

    def __init__(self, refused: str) -> None:
        super().__init__(temp_database())
        self.refused = refused
        self.down = False

    async def save(self, records: Sequence[ConversationRecord]) -> None:
        if self.down:
            raise OperationalError("INSERT", {}, ConnectionRefusedError("the store is down"))
        if any(record.id == self.refused for record in records):
            raise ValueError("a value the store cannot take")
        await super().save(records)


class Live:
    """A conversation with one turn to store until it is stored."""

    def __init__(self, id_char: str) -> None:
        self.record = conversation(id_char, [turn(0, "q", "a", 1, ended=True)])
        self.pending = True

    @property
    def id(self) -> str:
        return self.record.id

    def snapshot(self) -> ConversationRecord | None:
        pending, self.pending = self.pending, False
        return self.record if pending else None

    def unsaved(self, record: ConversationRecord) -> None:
        self.pending = True


async def test_one_refused_conversation_does_not_hold_up_the_others() -> None:
    good, bad, other = Live("a"), Live("b"), Live("c")
    store = Picky(refused=bad.id)
    await store.start()
    writer = WriteBehind(store)
    try:
        for live in (good, bad, other):
            writer.changed(live)
        await writer.flush()
        assert await store.load(good.id) is not None
        assert await store.load(other.id) is not None
        assert await store.load(bad.id) is None
        assert writer.pending(bad.id)  # kept, to be tried again
        assert not writer.pending(good.id)
    finally:
        await store.engine.dispose()


async def test_an_outage_keeps_every_change_for_the_next_try() -> None:
    first, second = Live("d"), Live("e")
    store = Picky(refused="")
    await store.start()
    writer = WriteBehind(store)
    try:
        store.down = True
        writer.changed(first)
        writer.changed(second)
        with pytest.raises(OperationalError):
            await writer.flush()
        assert writer.pending(first.id)
        assert writer.pending(second.id)
        store.down = False
        await writer.flush()
        assert await store.load(first.id) is not None
        assert await store.load(second.id) is not None
    finally:
        await store.engine.dispose()
