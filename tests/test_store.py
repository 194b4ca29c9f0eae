"""The SQL store on a real SQLite file: round trips, replacing a turn, crash recovery, paging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from backend.store.db import metadata
from backend.store.deliveries import DeliveryQueue
from backend.store.records import ConversationRecord, DeliveryRecord, TurnRecord, now
from backend.store.sql import CRASH_GAP, SqlStore
from schemas import ChatResponse
from tests.harness import temp_database


def frame(kind: str, seq: int, **fields: str) -> ChatResponse:
    made = ChatResponse.bot(kind, **fields)  # type: ignore[arg-type]
    made.seq = seq
    return made


def turn(position: int, question: str, answer: str, first_seq: int, ended: bool) -> TurnRecord:
    record = TurnRecord(position, question, echo_seq=first_seq)
    record.events.append(frame("start", first_seq + 1))
    record.text_base = first_seq + 1
    record.parts = [answer]
    if ended:
        record.events.append(frame("end", first_seq + 2 + len(answer), status="completed"))
        record.status = "completed"
    return record


def conversation(id_char: str, turns: list[TurnRecord], age: float = 0) -> ConversationRecord:
    moment = now() - timedelta(seconds=age)
    last = max(t.last_seq for t in turns)
    return ConversationRecord(id_char * 32, "title", moment, moment, last, len(turns), turns)


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SqlStore]:
    """The store on each database it supports."""
    if request.param == "sqlite":
        url = temp_database()
    else:
        url = request.getfixturevalue("postgres").database()
    opened = SqlStore(url)
    await opened.start()
    yield opened
    await opened.close()


async def test_a_conversation_round_trips(store: SqlStore) -> None:
    saved = conversation("a", [turn(0, "q1", "a1", 1, True), turn(1, "q2", "a2", 10, True)])
    await store.save([saved])
    loaded = await store.load("a" * 32)
    assert loaded is not None
    assert [(t.question, t.text, t.status) for t in loaded.turns] == [
        ("q1", "a1", "completed"),
        ("q2", "a2", "completed"),
    ]
    assert loaded.turns[1].events == saved.turns[1].events
    assert loaded.last_seq == saved.last_seq
    assert await store.load("b" * 32) is None


async def test_saving_a_turn_again_replaces_it(store: SqlStore) -> None:
    await store.save([conversation("a", [turn(0, "q", "old answer", 1, True)])])
    await store.save([conversation("a", [turn(0, "q", "new answer", 1, True)])])
    loaded = await store.load("a" * 32)
    assert loaded is not None
    assert [t.text for t in loaded.turns] == ["new answer"]


async def test_a_reply_cut_off_by_a_crash_is_closed_on_start(store: SqlStore) -> None:
    streaming = conversation("a", [turn(0, "q", "half of it", 1, ended=False)])
    await store.save([streaming])
    restarted = SqlStore(store.engine.url.render_as_string(hide_password=False))
    await restarted.start()
    loaded = await restarted.load("a" * 32)
    await restarted.close()
    assert loaded is not None
    cut = loaded.turns[0]
    assert cut.status == "interrupted"
    assert cut.text == "half of it"
    # Its `end` comes after anything the dead process may have sent without storing it.
    assert cut.events[-1].type == "end"
    assert cut.events[-1].seq == streaming.last_seq + CRASH_GAP
    assert loaded.last_seq == streaming.last_seq + CRASH_GAP


async def test_pages_are_newest_first_and_delete_removes(store: SqlStore) -> None:
    await store.save(
        [
            conversation("a", [turn(0, "q", "x", 1, True)], age=30),
            conversation("b", [turn(0, "q", "x", 1, True)], age=10),
            conversation("c", [turn(0, "q", "x", 1, True)], age=20),
        ]
    )
    assert [c.id[0] for c in await store.page("", 2, 0)] == ["b", "c"]
    assert [c.id[0] for c in await store.page("", 2, 2)] == ["a"]
    assert await store.delete("c" * 32)
    assert not await store.delete("c" * 32)
    assert [c.id[0] for c in await store.page("", 10, 0)] == ["b", "a"]
    assert await store.load("c" * 32) is None


async def test_search_finds_a_users_turns_in_any_case_and_only_theirs(store: SqlStore) -> None:
    mine = conversation("a", [turn(0, "Lighthouses?", "They guide ships.", 1, True)])
    mine.owner = "me"
    literal = conversation("b", [turn(0, "What is 100% of _x_?", "All of it.", 1, True)], age=5)
    literal.owner = "me"
    theirs = conversation("c", [turn(0, "lighthouses again", "Yes.", 1, True)])
    theirs.owner = "someone else"
    tools = conversation("d", [turn(0, "add", "5", 1, True)])
    tools.owner = "me"
    tools.assistant = "agent"
    tools.turns[0].exchanged = [{"type": "tool", "data": {"content": "5.0", "tool_call_id": "c"}}]
    await store.save([mine, literal, theirs, tools])
    found = await store.search("me", "LIGHTHOUSE", 10)
    assert [(f.conversation_id, f.question, f.answer) for f in found] == [
        ("a" * 32, "Lighthouses?", "They guide ships.")
    ]
    # `%` and `_` are searched for as written, not as patterns.
    assert [f.conversation_id for f in await store.search("me", "100%", 10)] == ["b" * 32]
    assert await store.search("me", "_y_", 10) == []
    assert await store.search("me", "ships", 0) == []
    loaded = await store.load("d" * 32)
    assert loaded is not None
    assert loaded.assistant == "agent"
    assert loaded.turns[0].exchanged == tools.turns[0].exchanged


async def test_the_migrations_make_the_tables_the_code_describes(store: SqlStore) -> None:
    """Alembic's own comparison finds nothing between the migrated database and `db.py`."""

    def differences(connection: Connection) -> list[object]:
        found: list[object] = compare_metadata(MigrationContext.configure(connection), metadata)
        return found

    async with store.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_deliveries_are_stored_with_the_turn_once_and_claimed_once(store: SqlStore) -> None:
    """A delivery saved twice (a snapshot saved again) is one row; a claimed one is not
    claimed again until its claim runs out or is given back."""
    moment = now()
    delivery = DeliveryRecord("msg_1", "bot", "reply.completed", "a" * 32, "", "{}", moment)
    record = conversation("a", [turn(0, "q", "a", 1, ended=True)])
    record.deliveries = [delivery]
    await store.save([record])
    await store.save([record])
    queue = DeliveryQueue(store.engine)
    [claimed] = await queue.claim(10, lease=60)
    assert (claimed.id, claimed.attempts, claimed.payload) == ("msg_1", 1, "{}")
    assert await queue.claim(10, lease=60) == []
    due = await queue.next_due()
    assert due is not None
    assert due > now() + timedelta(seconds=50)
    await queue.release(["msg_1"])
    [again] = await queue.claim(10, lease=60)
    assert again.attempts == 2
    await queue.delivered("msg_1", 204)
    assert await queue.next_due() is None
    [listed] = await queue.recent(10)
    assert (listed.status, listed.attempts, listed.last_response) == ("delivered", 2, 204)
