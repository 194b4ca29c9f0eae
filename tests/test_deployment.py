"""A deployment as the README describes it: nginx in front of two `python -m backend` workers
sharing Redis and PostgreSQL. Failures of a worker or of Redis, and draining one worker."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from deploy.services import Deployment, Postgres, Redis, Worker
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env
from tests.harness import (
    UNIT,
    Frame,
    close_of,
    connect,
    conversation_of,
    recv,
    text_of,
    until_end,
)


@pytest.fixture(scope="module")
def own_deployment(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> Iterator[Deployment]:
    env = deployment_env(upstream_server, postgres, redis_server)
    deployed = Deployment(2, {**env, "CHAT_SHUTDOWN_GRACE": "1"}).start()
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
    own_deployment: Deployment, fake: FakeUpstream
) -> None:
    leaving, staying = own_deployment.workers
    fake.default = Behaviour(tokens=[" q"] * 100, delay=0.01)
    sockets = 6
    async with asyncio.TaskGroup() as group:
        runs = [group.create_task(survive_a_drain(leaving, staying)) for _ in range(sockets)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(leaving.terminate)
    for run in runs:
        assert run.result() in ("completed", "interrupted")
    leaving.start()


async def survive_a_drain(leaving: Worker, staying: Worker) -> str:
    """Ask on the worker that is about to drain; rejoin on the other one after 1012."""
    async with connect(leaving.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("long")
        frames = await until_end(ws, within=UNIT * 5)
        assert (await close_of(ws, within=UNIT * 5))[0] == 1012
    url = f"{staying.ws}?conversation={conversation}&after={last_seq(frames)}"
    async with ws_connect(url) as ws:
        assert (await recv(ws))["conversation"] == conversation
        await ws.send(json.dumps({"type": "question", "message": "still there?"}))
        more = await until_end(ws)
        assert more[-1]["status"] == "completed"
    status: str = frames[-1]["status"]
    return status
