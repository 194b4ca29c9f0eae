"""Two workers on a real Redis Cluster (three primaries, each with a replica, from Debian's
`redis-server`) and PostgreSQL: a conversation's keys share one slot, replies stream, rejoin
and stop across workers as on one Redis, and a primary failing over during replies costs
nothing: they finish whole, and the questions asked after it are answered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient
from websockets.asyncio.client import ClientConnection

from backend.cluster.shared import Cluster
from backend.config.redis_clients import open_cluster
from deploy.services import Deployment, Postgres, RedisCluster
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env
from tests.harness import UNIT, Frame, ask, connect, conversation_of, recv, text_of, until_end


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster(primaries=3, replicas=1)
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture(scope="module")
def on_cluster(
    upstream_server: FakeUpstream, postgres: Postgres, redis_cluster: RedisCluster
) -> Iterator[Deployment]:
    env = deployment_env(upstream_server, postgres, redis_cluster)
    # Quotas on, far above what the tests ask: their counts and slots live in the cluster too.
    quotas = {"CHAT_QUOTA_QUESTIONS": "1000/minute", "CHAT_QUOTA_REPLIES": "100"}
    deployed = Deployment(2, {**env, **quotas, "CHAT_QUOTA_CONNECTIONS": "200"}).start()
    yield deployed
    deployed.remove()


def worker_ws(deployed: Deployment, n: int, query: str = "") -> str:
    """The socket URL of worker `n` itself, past nginx."""
    return f"{deployed.workers[n].ws}{query}"


async def keys_of(client: ClusterClient, conversation: str) -> list[str]:
    """Every key, on every primary, that names the conversation."""
    found: list[str] = []
    async for key in client.scan_iter(match=f"*{conversation}*"):
        found.append(str(key))
    return found


async def test_a_conversations_keys_share_one_slot_and_all_expire(
    on_cluster: Deployment, redis_cluster: RedisCluster, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["one ", "two"]))
    async with connect(worker_ws(on_cluster, 0)) as ws:
        conversation = conversation_of(ws)
        frames = await ask(ws, "count")
    assert text_of(frames) == "one two"
    client = open_cluster(redis_cluster.url, 4, decode_responses=True)
    try:
        keys = await keys_of(client, conversation)
        assert {key.rpartition(":")[2] for key in keys} >= {"frames", "seq", "owner"}
        slots = {client.keyslot(key) for key in keys}
        assert len(slots) == 1, keys
        for key in keys:
            assert await client.ttl(key) > 0, key  # nothing stays for ever
    finally:
        await client.aclose()


async def test_rejoin_and_stop_across_workers(on_cluster: Deployment, fake: FakeUpstream) -> None:
    words = [f" w{n}" for n in range(200)]
    fake.then(Behaviour(tokens=words, delay=0.01))
    async with connect(worker_ws(on_cluster, 0)) as first:
        conversation = conversation_of(first)
        await first.send("a long story")
        seen: list[Frame] = []
        while len(text_of(seen)) < 40:
            seen.append(await recv(first))
    after = max(f["seq"] for f in seen if "seq" in f)
    query = f"?conversation={conversation}&after={after}"
    async with connect(worker_ws(on_cluster, 1, query)) as second:
        rest = await until_end(second)
    assert text_of(seen) + text_of(rest) == "".join(words)
    # Stopped through the other worker: the model's request is closed at once.
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.01))
    query = f"?conversation={conversation}&after={max(f['seq'] for f in rest if 'seq' in f)}"
    async with connect(worker_ws(on_cluster, 0, query)) as runner:
        await runner.send("go on")
        while True:
            frame = await recv(runner)
            if frame["type"] == "stream" and frame["sender"] == "bot":
                break
        async with connect(worker_ws(on_cluster, 1, query)) as other:
            sent = time.monotonic()
            await other.send(json.dumps({"type": "stop"}))
            ended = [f for f in await until_end(runner) if f["type"] == "end"]
    assert ended[-1]["status"] == "interrupted"
    assert time.monotonic() - sent < UNIT
    record = fake.requests[-1]
    await fake.until(lambda: record.hung_up_at is not None, UNIT)


async def reply_whole(url: str, question: str) -> tuple[str, list[Frame]]:
    async with connect(url) as ws:
        conversation = conversation_of(ws)
        return conversation, await ask_slowly(ws, question)


async def ask_slowly(ws: ClientConnection, question: str) -> list[Frame]:
    await ws.send(json.dumps({"type": "question", "message": question}))
    return await until_end(ws, within=UNIT * 20)


async def test_a_primary_failing_over_during_replies_costs_nothing(
    on_cluster: Deployment, redis_cluster: RedisCluster, fake: FakeUpstream
) -> None:
    """`CLUSTER FAILOVER` on a replica while twelve replies stream (on both workers, over all
    three primaries): every reply arrives whole, with no error, and so do the questions asked
    after it, new conversations included."""
    words = [f" t{n}" for n in range(150)]
    fake.default = Behaviour(tokens=words, delay=0.01)  # every request, however many
    try:
        replies = [
            asyncio.create_task(reply_whole(worker_ws(on_cluster, n % 2), f"story {n}"))
            for n in range(12)
        ]
        await asyncio.sleep(0.4)
        primary = redis_cluster.primary_of(Cluster.frames("x"))
        replica = redis_cluster.replica_of(primary)
        assert redis_cluster.cli(replica, "cluster", "failover") == "OK"
        results = await asyncio.gather(*replies)
        await asyncio.to_thread(redis_cluster.wait_ok)
        assert redis_cluster.primary_of(Cluster.frames("x")).port == replica.port
        for _, frames in results:
            assert [f for f in frames if f["type"] == "error"] == []
            assert text_of(frames) == "".join(words)
        # After it: new conversations and more questions, on either worker.
        after = await asyncio.gather(
            *(reply_whole(worker_ws(on_cluster, n % 2), f"again {n}") for n in range(6))
        )
        for _, frames in after:
            assert text_of(frames) == "".join(words)
        conversation = results[0][0]
        async with connect(worker_ws(on_cluster, 1, f"?conversation={conversation}")) as ws:
            frames = await ask_slowly(ws, "and then?")
        assert text_of(frames) == "".join(words)
    finally:
        fake.default = Behaviour()
