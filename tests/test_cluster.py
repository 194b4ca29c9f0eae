"""Several workers on one Redis and one PostgreSQL behave as one server."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from backend.chat.outbox import Outbox
from backend.cluster.publishing import Broadcaster
from backend.cluster.relay import Follower, RedisRelays
from backend.cluster.shared import Cluster, Entry
from backend.config.timings import LEASE_MS
from deploy.services import Addressed, Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from schemas import ChatResponse
from tests.conftest import fake_settings
from tests.delay_proxy import delay_proxy
from tests.harness import (
    UNIT,
    Frame,
    LiveServer,
    ask,
    close_of,
    connect,
    conversation_of,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
    wait_hung_up,
)


@pytest.fixture(scope="module")
def workers(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> Iterator[list[LiveServer]]:
    """Two workers of one deployment."""
    settings = fake_settings(
        upstream_server,
        chat_database_url=postgres.database(),
        chat_redis_url=redis_server.url,
    )
    with live_server(settings) as one, live_server(settings) as two:
        yield [one, two]


def join_url(server: Addressed, conversation: str, after: int | None = None) -> str:
    url = f"{server.ws}?conversation={conversation}"
    return url if after is None else f"{url}&after={after}"


def last_seq(frames: list[Frame]) -> int:
    return max((f["seq"] for f in frames if "seq" in f), default=0)


async def test_a_turn_asked_on_one_worker_is_replayed_on_the_other(
    workers: list[LiveServer], fake: FakeUpstream
) -> None:
    one, two = workers
    async with connect(one.ws) as ws:
        conversation = conversation_of(ws)
        first = await ask(ws, "hello")
    async with ws_connect(join_url(two, conversation)) as ws:
        assert (await recv(ws))["conversation"] == conversation
        replayed = await until_end(ws)
        second = await ask(ws, "again")
    assert text_of(replayed) == text_of(first) == "You said: hello"
    assert [f["seq"] for f in replayed if f["type"] != "stream"] == [
        f["seq"] for f in first if f["type"] != "stream"
    ]
    assert second[0]["seq"] > last_seq(first)
    assert [m["content"] for m in fake.requests[1].messages[1:]] == [
        "hello",
        "You said: hello",
        "again",
    ]


async def test_the_opening_frame_counts_the_turns_other_workers_ran(
    workers: list[LiveServer], fake: FakeUpstream
) -> None:
    """A client joining on a worker that has not stored the first turn yet, or that did not
    run the latest turns (and still has the conversation in memory as it was), is told how
    many turns the conversation has: all of them."""
    one, two = workers
    fake.then(Behaviour(tokens=[" x"] * 200, delay=0.005))
    async with connect(one.ws) as asker:
        conversation = conversation_of(asker)
        await asker.send("go on")
        await until_reply_text(asker)
        async with ws_connect(join_url(two, conversation)) as ws:
            assert (await recv(ws))["message"] == "Joined a conversation of 1 turn."
        await until_end(asker)
    async with ws_connect(join_url(two, conversation)) as ws:
        await recv(ws)
        await until_end(ws)
        await ask(ws, "second")
        await ask(ws, "third")
    async with ws_connect(join_url(one, conversation)) as ws:
        assert (await recv(ws))["message"] == "Joined a conversation of 3 turns."


async def test_rejoin_mid_reply_on_the_other_worker_is_exact(
    workers: list[LiveServer], fake: FakeUpstream
) -> None:
    words = [f" w{n}" for n in range(300)]
    fake.then(Behaviour(tokens=words, delay=0.006))
    rng = random.Random(9)
    async with connect(workers[0].ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a long story")
        received: list[Frame] = []
        while len(text_of(received)) < 20:
            received.append(await recv(ws))
    drops = 0
    while received[-1]["type"] != "end":
        server = workers[drops % 2 - 1]
        async with ws_connect(join_url(server, conversation, last_seq(received))) as ws:
            await recv(ws)
            target = len(text_of(received)) + rng.randint(1, 80)
            while len(text_of(received)) < target:
                received.append(await recv(ws))
                if received[-1]["type"] == "end":
                    break
        drops += 1
    assert drops >= 10
    assert text_of(received) == "".join(words)
    assert [f["seq"] for f in received] == sorted({f["seq"] for f in received})


async def test_stop_through_the_other_worker(workers: list[LiveServer], fake: FakeUpstream) -> None:
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.005))
    async with connect(workers[0].ws) as first:
        conversation = conversation_of(first)
        async with connect(join_url(workers[1], conversation)) as second:
            await first.send("go on")
            await until_reply_text(second)
            await second.send(json.dumps({"type": "stop"}))
            assert (await until_end(second))[-1]["status"] == "interrupted"
            assert (await until_end(first))[-1]["status"] == "interrupted"
    await wait_hung_up(fake, 0)


async def two_replies(ws: ClientConnection) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(UNIT * 5):
        while sum(f["type"] == "end" for f in frames) < 2:
            frames.append(await recv(ws))
    return frames


async def test_questions_on_two_workers_at_once_give_one_reply_at_a_time(
    workers: list[LiveServer], fake: FakeUpstream
) -> None:
    fake.default = Behaviour(tokens=[" y"] * 50, delay=0.01)
    async with connect(workers[0].ws) as first:
        conversation = conversation_of(first)
        async with connect(join_url(workers[1], conversation)) as second:
            await asyncio.gather(first.send("from one"), second.send("from two"))
            seen = await asyncio.gather(two_replies(first), two_replies(second))
    assert seen[0] == seen[1]
    frames = seen[0]
    # Never two replies at once: every start is followed by its end before the next start.
    opened = 0
    for frame in frames:
        if frame["type"] == "start":
            assert opened == 0
            opened += 1
        elif frame["type"] == "end":
            opened -= 1
    assert [f["status"] for f in frames if f["type"] == "end"] == ["interrupted", "completed"]


async def test_a_first_reply_on_one_worker_is_readable_and_deletable_on_the_other(
    workers: list[LiveServer], fake: FakeUpstream
) -> None:
    one, two = workers
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.005))
    async with connect(one.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("go on")
        await until_reply_text(ws)
        async with httpx.AsyncClient(base_url=two.http, timeout=UNIT) as client:
            # Not in the database yet: worker two reads the turn from the stream.
            read = (await client.get(f"/api/conversations/{conversation}")).json()
            assert read["title"] == "go on"
            assert [m["role"] for m in read["messages"]] == ["user", "assistant"]
            assert read["messages"][1]["status"] == "streaming"
            assert read["messages"][1]["text"].startswith(" x")
            deleted = await client.delete(f"/api/conversations/{conversation}")
            assert deleted.status_code == 204
            assert (await close_of(ws))[0] == 1008
            await wait_hung_up(fake, 0)
            # The stopped reply is not written back after the deletion.
            await asyncio.sleep(1.5)
            for server in workers:
                gone = await client.get(f"{server.http}/api/conversations/{conversation}")
                assert gone.status_code == 404


class SlowReplay(Cluster):
    """A worker whose reads of a conversation's replay are slow once `slow` is set."""

    slow = False

    async def turn_frames(self, conversation_id: str, after: int) -> tuple[int | None, list[Entry]]:
        found = await super().turn_frames(conversation_id, after)
        if self.slow:
            await asyncio.sleep(2.5)  # more than the store's one-second tick
        return found


async def test_a_catch_up_slower_than_a_store_write_sends_the_text_once(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis, fake: FakeUpstream
) -> None:
    """A client joins on worker 2 just before the first question; its catch-up reads the
    stream (not begun yet), then, slowly, the database, by which time worker 1 has stored the
    turn mid-reply. The stream, not that copy, must give the client the turn."""
    settings = fake_settings(
        upstream_server, chat_database_url=postgres.database(), chat_redis_url=redis_server.url
    )
    slow = SlowReplay(redis_server.url)
    # Worker 1's Redis is far away, so tokens merge into entries a stored copy can end inside.
    with (
        delay_proxy(redis_server.port, 0.02) as far,
        live_server(
            settings, relays=RedisRelays(Cluster(f"redis://127.0.0.1:{far.port}/0"))
        ) as one,
        live_server(settings, relays=RedisRelays(slow)) as two,
    ):
        await run_catch_up(one, two, slow, fake)


async def run_catch_up(
    one: LiveServer, two: LiveServer, slow: SlowReplay, fake: FakeUpstream
) -> None:
    words = [f" w{n}" for n in range(1000)]
    fake.then(Behaviour(tokens=words, delay=0.003))
    async with connect(one.ws) as asker:
        conversation = conversation_of(asker)
        slow.slow = True
        async with ws_connect(join_url(two, conversation)) as follower:
            await recv(follower)
            await asker.send("a long story")
            frames = await until_end(follower, within=UNIT * 5)
    assert text_of(frames) == "".join(words)
    assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})


async def test_a_renewal_for_a_lease_given_back_spares_the_next_reply(
    redis_server: Redis,
) -> None:
    """A reply gives its lease back while a renewal is on its way: the renewal, which finds
    the lease free, takes it for nobody, so it is given back again; the next reply takes it,
    and the old renewal's outcome is not about the next reply's hold."""
    cluster = Cluster(redis_server.url)
    conversation = uuid.uuid4().hex
    lost: list[str] = []
    try:
        first = cluster.lease(conversation, lambda: lost.append("first reply"))
        assert await first.acquire()
        pipeline = cluster.redis.pipeline
        racing = pipeline(transaction=False)
        execute = racing.execute

        async def give_back_then_execute(raise_on_error: bool = True) -> list[Any]:
            """A renewal round trip during which the lease is given back."""
            await first.give_back()
            return await execute(raise_on_error)

        racing.execute = give_back_then_execute  # type: ignore[method-assign]
        cluster.redis.pipeline = lambda **_: racing  # type: ignore[method-assign,assignment]
        await cluster.renew()
        cluster.redis.pipeline = pipeline  # type: ignore[method-assign]
        assert await cluster.holder(conversation) is None
        following = cluster.lease(conversation, lambda: lost.append("next reply"))
        assert await following.acquire()
        await cluster.renew()  # the next reply's lease is renewed, and kept
        assert lost == []
        assert await cluster.holder(conversation) == cluster.worker
    finally:
        await cluster.redis.aclose()


async def test_a_lease_redis_lost_is_taken_again_unless_another_worker_has_it(
    redis_server: Redis,
) -> None:
    """Redis loses a lease held while a reply runs (a restart): the next renewal takes it again
    and the reply goes on. Not when another worker has taken it, or has ended the turn."""
    cluster = Cluster(redis_server.url)
    other = Cluster(redis_server.url)
    conversations = [uuid.uuid4().hex for _ in range(3)]
    lost: list[str] = []
    try:
        for conversation in conversations:
            lease = cluster.lease(conversation, functools.partial(lost.append, conversation))
            assert await lease.acquire()
        lapsed, taken, ended = conversations
        await cluster.redis.delete(*(Cluster.lease_key(c) for c in conversations))
        assert await other.lease(taken).acquire()
        end = ChatResponse.bot("end", status="error")
        await other.publish(ended, [Entry(7, end.to_json(), "end", 0)], fresh=True)
        await cluster.renew()
        assert await cluster.holder(lapsed) == cluster.worker
        assert lost == [taken, ended]
    finally:
        await cluster.redis.aclose()
        await other.redis.aclose()


async def test_a_reply_whose_conversation_another_worker_took_ends_with_an_error(
    workers: list[LiveServer], redis_server: Redis, fake: FakeUpstream
) -> None:
    """A reply that must stop because another worker holds its conversation now (taken while
    Redis had lost the lease) ends with `unavailable` and status `error`, not `interrupted`."""
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.005))
    async with connect(workers[0].ws) as asker:
        conversation = conversation_of(asker)
        async with connect(join_url(workers[1], conversation)) as follower:
            await asker.send("go on")
            await until_reply_text(asker)
            client = Cluster(redis_server.url).redis
            try:
                await client.set(Cluster.lease_key(conversation), "another-worker", px=LEASE_MS)
            finally:
                await client.aclose()
            seen = [await until_end(ws, within=UNIT * 2) for ws in (asker, follower)]
    for frames in seen:
        errors = [f for f in frames if f["type"] == "error"]
        assert [f["code"] for f in errors] == ["unavailable"]
        assert "another worker" in errors[0]["message"]
        assert frames[-1]["status"] == "error"
    await wait_hung_up(fake, 0)


class SlowAnnounce(Cluster):
    """A worker slow to tell Redis about a new conversation (its first connection, a busy
    Redis)."""

    async def announce(
        self, conversation_id: str, owner: str, assistant: str | None, watched: bool = False
    ) -> None:
        await asyncio.sleep(0.1)
        await super().announce(conversation_id, owner, assistant, watched)


async def test_a_new_conversation_is_joinable_on_the_other_worker_at_once(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    """The id in a new socket's opening frame names a conversation every worker knows, even
    when telling Redis takes a while."""
    settings = fake_settings(
        upstream_server, chat_database_url=postgres.database(), chat_redis_url=redis_server.url
    )
    with (
        live_server(settings, relays=RedisRelays(SlowAnnounce(redis_server.url))) as one,
        live_server(settings, relays=RedisRelays(SlowAnnounce(redis_server.url))) as two,
    ):
        await join_new_conversations([one, two])


async def join_new_conversations(workers: list[LiveServer]) -> None:
    for attempt in range(20):
        opening, joining = workers if attempt % 2 == 0 else workers[::-1]
        async with connect(opening.ws) as first:
            conversation = conversation_of(first)
            async with connect(join_url(joining, conversation)) as second:
                assert conversation_of(second) == conversation


def test_a_turn_whose_stream_replaced_frames_not_read_yet_is_caught_up_first() -> None:
    """Entries that begin a turn after frames this worker's clients were not sent (the stream
    was written anew for the turn before the tail read the end of the one before) are held
    for a catch-up, not sent over the gap; entries that follow on are sent."""
    echo = ChatResponse.echo("next", seq=10).to_json()
    behind = Follower(Outbox(), after=3)
    behind.waiting = None
    assert behind.take([Entry(10, echo, "stream", 1)]) is True
    assert behind.waiting is not None
    assert behind.last == 3
    end = ChatResponse.bot("end", status="completed")
    end.seq = 9
    behind.caught_up([end])
    assert behind.last == 10
    assert behind.waiting is None
    up_to_date = Follower(Outbox(), after=9)
    up_to_date.waiting = None
    assert up_to_date.take([Entry(10, echo, "stream", 1)]) is False
    assert up_to_date.last == 10


async def test_a_batch_sent_again_after_a_failure_reaches_the_clients_here_whole(
    redis_server: Redis,
) -> None:
    """After a send whose outcome is unknown (a failover, a dropped connection), the entries
    the stream got anyway are not sent again, and the clients here are handed them all the
    same, then the rest once it is sent."""
    cluster = Cluster(redis_server.url)
    await cluster.start()
    try:
        conversation = uuid.uuid4().hex
        entries = [
            Entry(seq, ChatResponse.tokens(f" w{seq}", seq=seq).to_json(), "text", 0)
            for seq in range(1, 6)
        ]
        await cluster.publish(conversation, entries[:3], fresh=True)  # got before the failure
        handed: list[int] = []
        publisher = Broadcaster(cluster).publisher(conversation, 0, 1, lambda: None, lambda: None)
        publisher.fresh = False
        publisher.delivered = lambda got: handed.extend(entry.seq for entry in got)
        publisher.unsent = list(entries)
        publisher.retrying = True
        await publisher.broadcaster._send([publisher])
        assert handed == [1, 2, 3, 4, 5]
        assert [entry.seq for entry in await cluster.whole_turn(conversation)] == [1, 2, 3, 4, 5]
    finally:
        await cluster.close()
