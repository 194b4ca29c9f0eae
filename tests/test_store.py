"""The SQL store on a real SQLite file: round trips, replacing a turn, crash recovery, paging."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from backend.store.db import described, metadata
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


async def test_conversations_are_found_by_words_of_their_titles_questions_and_replies(
    store: SqlStore,
) -> None:
    """Each word starts a word of the title or of one finished turn, in any case; punctuation
    and query syntax are only text; streaming and other users' turns are not searched; a
    turn is found by its new text once rewritten, and no more once deleted."""
    rivers = conversation("a", [turn(0, "Name three rivers", "Nile, Amazon, Yangtze.", 1, True)])
    cafe = conversation("b", [turn(0, "Where to eat?", "The Café Rouge in Paris.", 1, True)])
    live = conversation("c", [turn(0, "tell me", "about photosynthesis", 1, ended=False)])
    theirs = conversation("d", [turn(0, "Name three rivers", "Nile.", 1, True)])
    for record in (rivers, cafe, live):
        record.owner = "me"
    theirs.owner = "someone else"
    await store.save([rivers, cafe, live, theirs])

    async def found(search: str) -> list[str]:
        return [row.id[0] for row in await store.page("me", 10, 0, search)]

    assert await found("AMAZON") == ["a"]
    assert await found("amaz riv") == ["a"]  # every word, each as a word's start
    assert await found("mazon") == []  # a word's start, not its middle
    assert await found("amazon paris") == []  # every word in one turn (or the title)
    assert await found("café") == ["b"]
    assert await found('"nile*" ( ^ -') == ["a"]  # no query syntax, just the words
    assert await found("photosynthesis") == []  # a reply still streaming
    assert await found("?!") == []
    assert len(await found("  ")) == 3  # blank: everything
    rivers.turns[0].parts = ["Danube and Rhine."]
    await store.save([rivers])
    assert await found("amazon") == []
    assert await found("danube") == ["a"]
    live.turns[0].status = "completed"
    await store.save([live])
    assert await found("photosynthesis") == ["c"]
    await store.delete(live.id)
    assert await found("photosynthesis") == []
    assert [row.id[0] for row in await store.page("someone else", 10, 0, "nile")] == ["d"]


async def test_a_search_is_answered_from_the_index(store: SqlStore) -> None:
    """The database's plan for a search reads the search index, not every turn's text."""
    query = store.page_query("me", 10, 0, "rivers")
    assert query is not None
    sqlite = store.engine.dialect.name == "sqlite"
    async with store.engine.connect() as connection:
        if not sqlite:
            # On tables this small a scan is cheaper; what is asked is whether the index can
            # answer the very expression the query uses.
            await connection.execute(text("SET enable_seqscan = off"))
        compiled = query.compile(store.engine, compile_kwargs={"literal_binds": True})
        explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
        rows = await connection.execute(text(explain + str(compiled)))
        plan = "\n".join(str(row[-1]) for row in rows)
    if sqlite:
        assert "search_titles VIRTUAL TABLE INDEX" in plan, plan
        assert "search_turns VIRTUAL TABLE INDEX" in plan, plan
    else:
        assert "ix_conversations_search" in plan, plan
        assert "ix_turns_search" in plan, plan


async def test_a_renamed_conversation_keeps_its_name_and_is_found_by_it(store: SqlStore) -> None:
    record = conversation("a", [turn(0, "first question", "answer", 1, True)])
    record.owner = "me"
    await store.save([record])
    assert await store.rename(record.id, "someone else", "Stolen") is None
    assert await store.rename("b" * 32, "me", "Nothing") is None
    renamed = await store.rename(record.id, "me", "Trip to Lisbon")
    assert renamed is not None
    assert (renamed.id, renamed.title, renamed.turn_count) == (record.id, "Trip to Lisbon", 1)
    # Saved again from memory with the title the first question gave: the name stays.
    record.turns.append(turn(1, "second", "answer", 10, True))
    record.turn_count = 2
    await store.save([record])
    [listed] = await store.page("me", 10, 0)
    assert (listed.title, listed.turn_count) == ("Trip to Lisbon", 2)
    assert [row.title for row in await store.page("me", 10, 0, "lisbon")] == ["Trip to Lisbon"]
    assert await store.page("me", 10, 0, "title") == []


async def test_the_migrations_make_the_tables_the_code_describes(store: SqlStore) -> None:
    """Alembic's own comparison finds nothing between the migrated database and `db.py`."""

    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"include_object": described})
        found: list[object] = compare_metadata(context, metadata)
        return found

    async with store.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_finished_deliveries_are_deleted_once_kept_long_enough(store: SqlStore) -> None:
    """Pruning deletes delivered and failed deliveries last attempted before the cut-off, in
    batches, and leaves pending ones and recent ones."""
    old, moment = now() - timedelta(days=8), now()
    deliveries = [
        DeliveryRecord(f"msg_{n}", "bot", "reply.completed", "a" * 32, "", "{}", created)
        for n, created in enumerate([old, old, old, old, moment])
    ]
    record = conversation("a", [turn(0, "q", "a", 1, ended=True)])
    record.deliveries = deliveries
    await store.save([record])
    queue = DeliveryQueue(store.engine)
    claimed = await queue.claim(10, lease=60)
    assert len(claimed) == 5
    await queue.delivered("msg_0", 204)
    await queue.failed("msg_1", 410, "gone")
    await queue.delivered("msg_4", 204)
    await queue.release(["msg_2", "msg_3"])  # still pending
    cut_off = now() + timedelta(seconds=1)  # every attempt above was made before it
    assert await queue.prune(cut_off, limit=1) == 1
    assert await queue.prune(cut_off, limit=10) == 2
    assert await queue.prune(cut_off, limit=10) == 0
    left = {delivery.id: delivery.status for delivery in await queue.recent(10)}
    assert left == {"msg_2": "pending", "msg_3": "pending"}
    await queue.delivered("msg_2", 204)
    assert await queue.prune(now() - timedelta(days=1)) == 0  # attempted just now: kept


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
