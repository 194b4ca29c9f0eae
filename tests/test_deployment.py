"""A deployment as the README describes it: nginx in front of two `python -m backend` workers
sharing Redis and PostgreSQL. Failures of a worker or of Redis, and draining one worker."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from backend.cluster.shared import Cluster
from deploy.services import Deployment, Postgres, Redis, Worker
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env
from tests.harness import (
    UNIT,
    Frame,
    ask,
    close_of,
    connect,
    conversation_of,
    recv,
    text_of,
    until_end,
    until_reply_text,
)

# What the drain drill relies on: replies in flight get this long to finish when a worker is
# told to stop, and each reply of the fake model takes about `REPLY_S` seconds.
GRACE_S = 1.0
REPLY = Behaviour(tokens=[" q"] * 100, delay=0.01)
REPLY_S = 100 * 0.01


@pytest.fixture(scope="module")
def own_deployment(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> Iterator[Deployment]:
    env = deployment_env(upstream_server, postgres, redis_server)
    deployed = Deployment(2, {**env, "CHAT_SHUTDOWN_GRACE": str(GRACE_S)}).start()
    yield deployed
    deployed.remove()


def last_seq(frames: list[Frame]) -> int:
    return max((f["seq"] for f in frames if "seq" in f), default=0)


async def read_text(ws: ClientConnection, frames: list[Frame], chars: int) -> None:
    while len(text_of(frames)) < chars and (not frames or frames[-1]["type"] != "end"):
        frames.append(await recv(ws))


async def test_rejoin_through_the_proxy_at_random_points_is_exact(
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    words = [f" w{n}" for n in range(300)]
    fake.then(Behaviour(tokens=words, delay=0.006))
    rng = random.Random(11)
    async with connect(own_deployment.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a long story")
        received: list[Frame] = []
        await read_text(ws, received, rng.randint(1, 30))
    drops = 0
    while received[-1]["type"] != "end":
        url = f"{own_deployment.ws}?conversation={conversation}&after={last_seq(received)}"
        async with ws_connect(url) as ws:  # round-robin: every other one on each worker
            await recv(ws)
            await read_text(ws, received, len(text_of(received)) + rng.randint(1, 60))
        drops += 1
    assert drops >= 20
    assert text_of(received) == "".join(words)
    assert [f["seq"] for f in received] == sorted({f["seq"] for f in received})


async def test_kill_9_of_the_worker_writing_a_reply(
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    runner, watcher = own_deployment.workers
    fake.then(Behaviour(tokens=[" z"] * 5000, delay=0.005))
    async with connect(runner.ws) as asker:
        conversation = conversation_of(asker)
        await asker.send("go on")
        await recv(asker)
    # The asker left; the reply goes on for the client on the other worker, which is watching.
    async with connect(f"{watcher.ws}?conversation={conversation}") as ws:
        seen: list[Frame] = []
        await read_text(ws, seen, 40)
        runner.kill()
        killed_at = time.monotonic()
        seen += await until_end(ws, within=UNIT * 5)
        assert time.monotonic() - killed_at < 5
        error = [f for f in seen if f["type"] == "error"]
        assert [f["code"] for f in error] == ["upstream_dropped"]
        assert seen[-1]["status"] == "error"
        # The next question works, on the worker that is left.
        await ws.send("are you still there?")
        after = await until_end(ws)
        assert after[-1]["status"] == "completed"
    runner.start()
    async with httpx.AsyncClient(timeout=UNIT) as client:
        stored = (
            await client.get(f"{own_deployment.http}/api/conversations/{conversation}")
        ).json()
    cut = stored["messages"][1]
    assert cut["status"] == "error"
    assert cut["text"] == text_of(seen)  # exactly what the clients saw
    assert fake.requests[-1].messages[2]["content"] == text_of(seen)


async def writes_log(deployed: Deployment) -> AsyncEngine:
    """The deployment's database, in which every insert or update of a turn is logged from
    now on, with its conversation, in `turn_writes`."""
    engine = create_async_engine(deployed.workers[0].env["CHAT_DATABASE_URL"])
    async with engine.begin() as connection:
        for statement in (
            "CREATE TABLE IF NOT EXISTS turn_writes (conversation_id text, position int)",
            """CREATE OR REPLACE FUNCTION log_turn_write() RETURNS trigger AS $$
            BEGIN
              INSERT INTO turn_writes VALUES (NEW.conversation_id, NEW.position);
              RETURN NEW;
            END $$ LANGUAGE plpgsql""",
            "DROP TRIGGER IF EXISTS turn_writes ON turns",
            "CREATE TRIGGER turn_writes AFTER INSERT OR UPDATE ON turns "
            "FOR EACH ROW EXECUTE FUNCTION log_turn_write()",
        ):
            await connection.execute(text(statement))
    return engine


async def query(engine: AsyncEngine, sql: str, **values: object) -> list[Any]:
    async with engine.connect() as connection:
        return list(await connection.execute(text(sql), values))


async def test_a_turn_is_written_to_postgresql_once_it_ends(
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    """Redis holds the turn in flight: PostgreSQL gets a first turn as it begins (so the
    conversation is listed) and as it ends, a later one only as it ends, however long they
    stream (a second each here, 3 s)."""
    log = await writes_log(own_deployment)
    try:
        fake.then(*[Behaviour(tokens=[" s"] * 300, delay=0.01)] * 2)
        async with connect(own_deployment.workers[0].ws) as ws:
            conversation = conversation_of(ws)
            first = await ask(ws, "a long story")
            second = await ask(ws, "another")
        assert first[-1]["status"] == second[-1]["status"] == "completed"
        count = (
            "SELECT position, count(*) AS writes FROM turn_writes "
            "WHERE conversation_id = :id GROUP BY position ORDER BY position"
        )
        async with asyncio.timeout(UNIT * 5):  # the end is stored as the turn is given back
            while True:
                rows = await query(log, count, id=conversation)
                if len(rows) == 2:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # and nothing more, at the writer's next tick
        rows = await query(log, count, id=conversation)
        assert [(row.position, row.writes) for row in rows] == [(0, 2), (1, 1)]
    finally:
        async with log.begin() as connection:
            await connection.execute(text("DROP TRIGGER IF EXISTS turn_writes ON turns"))
        await log.dispose()


async def test_kill_9_mid_reply_with_nobody_watching_stores_what_the_stream_held(
    own_deployment: Deployment, fake: FakeUpstream, redis_server: Redis
) -> None:
    """The worker running a reply dies while no client watches it anywhere: another worker
    finds it dead, ends the turn and stores it, with the text its stream held."""
    runner, other = own_deployment.workers
    fake.then(Behaviour(tokens=[" k"] * 5000, delay=0.005))
    async with connect(runner.ws) as asker:
        conversation = conversation_of(asker)
        await asker.send("go on")
        seen: list[Frame] = []
        await read_text(asker, seen, 40)
    runner.kill()
    shared = aioredis.from_url(runner.env["CHAT_REDIS_URL"], decode_responses=True)
    try:
        held = "".join(
            json.loads(fields["f"])["message"]
            for _, fields in await cast(Any, shared.xrange(Cluster.frames(conversation)))
            if fields["k"] == "text"
        )
    finally:
        await shared.aclose()
    assert held.startswith(text_of(seen))
    database = create_async_engine(other.env["CHAT_DATABASE_URL"])
    try:
        async with asyncio.timeout(UNIT * 30):
            while True:
                rows = await query(
                    database,
                    "SELECT status, text FROM turns WHERE conversation_id = :id",
                    id=conversation,
                )
                if rows and rows[0].status is not None:
                    break
                await asyncio.sleep(0.5)
        assert (rows[0].status, rows[0].text) == ("error", held)
    finally:
        await database.dispose()
        runner.start()


async def test_a_worker_starting_leaves_the_replies_of_others_alone(
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    """A worker that starts (again) closes the turns a crash cut off, not the ones another
    worker is streaming, which the store has as streaming too."""
    runner, starting = own_deployment.workers
    fake.then(Behaviour(tokens=[" r"] * 600, delay=0.01))
    database = create_async_engine(runner.env["CHAT_DATABASE_URL"])
    try:
        async with connect(runner.ws) as ws:
            conversation = conversation_of(ws)
            await ws.send("a long first reply")
            await until_reply_text(ws)
            await asyncio.to_thread(starting.terminate)
            await asyncio.to_thread(starting.start)
            rows = await query(
                database, "SELECT status FROM turns WHERE conversation_id = :id", id=conversation
            )
            assert [row.status for row in rows] == [None]  # still streaming, as it is
            frames = await until_end(ws, within=UNIT * 10)
        assert frames[-1]["status"] == "completed"
    finally:
        await database.dispose()


async def test_a_conversation_deleted_mid_reply_elsewhere_stays_deleted(
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    """Deleted through one worker while its reply runs on the other: the reply ends, and the
    id is nobody's conversation on either worker from then on."""
    runner, other = own_deployment.workers
    fake.then(Behaviour(tokens=[" d"] * 400, delay=0.01))
    async with connect(runner.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a reply to delete")
        await until_reply_text(ws)
        async with httpx.AsyncClient(base_url=other.http, timeout=UNIT) as client:
            assert (await client.delete(f"/api/conversations/{conversation}")).status_code == 204
        assert (await close_of(ws))[0] == 1008
    await asyncio.sleep(1.0)  # the reply's worker has given its turn back by now
    for worker in (runner, other):
        async with ws_connect(f"{worker.ws}?conversation={conversation}") as ws:
            assert (await close_of(ws))[0] == 1008
        async with httpx.AsyncClient(base_url=worker.http, timeout=UNIT) as client:
            assert (await client.get(f"/api/conversations/{conversation}")).status_code == 404


async def ask_until_served(ws: ClientConnection, question: str) -> list[Frame]:
    """Ask again every 0.2 s while the answer is an error (shared state still coming back)."""
    async with asyncio.timeout(UNIT * 5):
        while True:
            await ws.send(question)
            frames = [await recv(ws, within=UNIT * 5)]
            if frames[0]["type"] != "error":
                return frames + await until_end(ws)
            await asyncio.sleep(0.2)


async def test_redis_restart_mid_conversation(
    own_deployment: Deployment, redis_server: Redis, fake: FakeUpstream
) -> None:
    async with connect(own_deployment.ws) as ws:
        await ws.send("before")
        assert (await until_end(ws))[-1]["status"] == "completed"
        redis_server.stop()
        await ws.send("during")
        error = await recv(ws, within=UNIT * 5)
        assert error["type"] == "error"
        assert error["code"] == "unavailable"
        redis_server.start()
        frames = await ask_until_served(ws, "after")
    assert frames[-1]["status"] == "completed"
    assert text_of(frames) == "You said: after"


async def test_postgres_restart_mid_conversation(
    own_deployment: Deployment, postgres: Postgres, fake: FakeUpstream
) -> None:
    async with connect(own_deployment.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("before")
        assert (await until_end(ws))[-1]["status"] == "completed"
        await asyncio.to_thread(postgres.stop)
        try:
            await ws.send("during")
            error = await recv(ws, within=UNIT * 5)
            assert error["type"] == "error"
            assert error["code"] == "unavailable"
        finally:
            await asyncio.to_thread(postgres.start)
        frames = await ask_until_served(ws, "after")
    assert frames[-1]["status"] == "completed"
    async with httpx.AsyncClient(timeout=UNIT) as client:
        stored = (
            await client.get(f"{own_deployment.http}/api/conversations/{conversation}")
        ).json()
    asked = [m["text"] for m in stored["messages"] if m["role"] == "user"]
    assert asked[0] == "before"
    assert asked[-1] == "after"


async def test_sigterm_of_one_worker_under_load(
    own_deployment: Deployment, fake: FakeUpstream, redis_server: Redis
) -> None:
    await drain_drill(own_deployment, fake, redis_server)


async def test_sigterm_of_one_worker_right_after_a_redis_restart(
    own_deployment: Deployment, fake: FakeUpstream, redis_server: Redis
) -> None:
    """The drill again with every pool of both workers holding connections that went with
    the Redis before: none of them may cost a question its answer."""
    async with asyncio.TaskGroup() as group:
        for n in range(40):
            group.create_task(ask_once(own_deployment.workers[n % 2].ws, f"warm {n}"))
    await asyncio.to_thread(redis_server.stop)
    await asyncio.to_thread(redis_server.start)
    await drain_drill(own_deployment, fake, redis_server)


async def ask_once(url: str, question: str) -> None:
    async with connect(url) as ws:
        await ws.send(question)
        assert (await until_end(ws))[-1]["status"] == "completed"


async def drain_drill(own_deployment: Deployment, fake: FakeUpstream, redis_server: Redis) -> None:
    """SIGTERM to one worker while it runs replies. What users are promised: replies in
    flight end within the grace, their sockets are closed with 1012, and a question on the
    other worker is answered at once, never waiting for a lease of the worker that drained (it
    gives them all back as it stores its replies). Each limit is the promise, plus `UNIT` for
    this machine."""
    leaving, staying = own_deployment.workers
    fake.default = REPLY
    sockets = 6
    leases = aioredis.Redis.from_url(
        own_deployment.workers[0].env["CHAT_REDIS_URL"], decode_responses=True
    )
    asked: list[str] = []
    try:
        async with asyncio.TaskGroup() as group:
            runs = [
                group.create_task(survive_a_drain(leaving, staying, asked)) for _ in range(sockets)
            ]
            # Once every reply runs, on the worker about to drain: whose leases these are.
            keys = await leases_held(leases, asked, sockets)
            drained = {await leases.get(key) for key in keys}
            await asyncio.to_thread(leaving.terminate)
            left = [key for key in keys if await leases.get(key) in drained]
            assert left == []
        assert len(drained) == 1
        for run in runs:
            assert run.result() in ("completed", "interrupted")
    finally:
        await leases.aclose()
    leaving.start()


async def leases_held(client: aioredis.Redis, asked: list[str], count: int) -> list[str]:
    """The lease keys of the `count` conversations in `asked`, once all of them are held."""
    async with asyncio.timeout(UNIT):
        while True:
            keys = [Cluster.lease_key(conversation) for conversation in asked]
            if len(keys) == count and await client.exists(*keys) == count:
                return keys
            await asyncio.sleep(0.01)


async def survive_a_drain(leaving: Worker, staying: Worker, asked: list[str]) -> str:
    """Ask on the worker that is about to drain (noted in `asked`); rejoin on the other one
    after 1012."""
    async with connect(leaving.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("long")
        asked.append(conversation)
        frames = await until_end(ws, within=GRACE_S + UNIT)
        assert (await close_of(ws, within=UNIT))[0] == 1012
    url = f"{staying.ws}?conversation={conversation}&after={last_seq(frames)}"
    async with ws_connect(url) as ws:
        assert (await recv(ws))["conversation"] == conversation
        await ws.send(json.dumps({"type": "question", "message": "still there?"}))
        echo = await recv(ws, within=UNIT)
        assert (echo["sender"], echo["message"]) == ("you", "still there?"), echo
        more = await until_end(ws, within=REPLY_S + UNIT)
        assert more[-1]["status"] == "completed"
    status: str = frames[-1]["status"]
    return status
