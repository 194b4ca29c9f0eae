"""Redis and PostgreSQL going away and coming back under a deployment (nginx, two workers):
what clients that stayed, and clients that come after, get."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from backend.cluster.shared import Cluster
from backend.cluster.tail import Tail
from backend.observe.metrics import Metrics
from backend.users.quotas import Quotas
from deploy.services import Deployment, Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env, fake_settings
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
)


class Outage:
    """A deployment with a Redis of its own, to stop and start without disturbing the others."""

    def __init__(self, fake: FakeUpstream, postgres: Postgres) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="chat-outage-"))
        self.redis = Redis()
        self.redis.start()
        env = deployment_env(fake, postgres, self.redis)
        # Quotas on, so the rate limiter's connections to Redis are in the way of every question.
        env.update(CHAT_QUOTA_QUESTIONS="100000/minute", CHAT_QUOTA_REPLIES="1000")
        self.deployment = Deployment(2, env, self.folder).start()
        self.workers = self.deployment.workers

    def logs(self) -> list[str]:
        """What each worker has logged so far."""
        return [worker.log.read_text() if worker.log else "" for worker in self.workers]

    def logged_since(self, before: list[str]) -> str:
        """What the workers have logged since `logs()` gave `before`."""
        return "".join(now[len(then) :] for now, then in zip(self.logs(), before, strict=True))

    def restart_redis(self) -> None:
        """Stop Redis (its data goes with it) and start it again on the same port."""
        self.redis.stop()
        self.redis.start()

    def crash_redis(self) -> None:
        """Redis goes at once, with its data, as in a crash, and is started again."""
        redis.Redis.from_url(self.redis.url).shutdown(nosave=True)
        self.redis.stop()
        self.redis.start()

    def remove(self) -> None:
        self.deployment.remove()
        self.redis.remove()


@pytest.fixture
def lone_redis() -> Iterator[Redis]:
    """A Redis for one test, to stop and start."""
    server = Redis()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def outage(upstream_server: FakeUpstream, postgres: Postgres) -> Iterator[Outage]:
    made = Outage(upstream_server, postgres)
    yield made
    made.remove()


async def asked_once(ws: ClientConnection, question: str) -> list[Frame]:
    """The frames of one question: its reply, or the error that refused it."""
    await ws.send(json.dumps({"type": "question", "message": question}))
    frames: list[Frame] = []
    async with asyncio.timeout(UNIT * 5):
        while not frames or frames[-1]["type"] not in ("end", "error"):
            frames.append(json.loads(await ws.recv()))
    return frames


async def new_client_asks(url: str, question: str) -> tuple[str, list[Frame]]:
    """A new socket asks one question: its conversation, and the frames of the question."""
    async with connect(url) as ws:
        return conversation_of(ws), await asked_once(ws, question)


async def client_rejoins_and_asks(url: str, conversation: str, question: str) -> list[Frame]:
    """A new socket joins a conversation of one turn, then asks: the frames of both."""
    async with connect(f"{url}?conversation={conversation}") as ws:
        history = await until_end(ws)
        return history + await asked_once(ws, question)


async def test_every_new_client_is_served_right_after_a_redis_restart(
    outage: Outage, fake: FakeUpstream
) -> None:
    workers = outage.workers
    # Busy first, so every pool of both workers holds connections to the Redis that goes.
    async with asyncio.TaskGroup() as group:
        warm = [
            group.create_task(new_client_asks(workers[n % 2].ws, f"warm {n}")) for n in range(40)
        ]
    async with connect(workers[0].ws) as stayed:
        assert (await ask(stayed, "before"))[-1]["status"] == "completed"
        await asyncio.to_thread(outage.restart_redis)
        # Right away: 30 new conversations, and 10 earlier ones joined on the other worker.
        async with asyncio.TaskGroup() as group:
            fresh = [
                group.create_task(new_client_asks(workers[n % 2].ws, f"after {n}"))
                for n in range(30)
            ]
            rejoined = [
                group.create_task(
                    client_rejoins_and_asks(workers[(n + 1) % 2].ws, warm[n].result()[0], "more")
                )
                for n in range(10)
            ]
        answers = [task.result()[1] for task in fresh] + [task.result() for task in rejoined]
        assert [frames[-1] for frames in answers if frames[-1]["type"] != "end"] == []
        for n, asked in enumerate(fresh):
            assert asked.result()[1][-1]["status"] == "completed"
            assert text_of(asked.result()[1]) == f"You said: after {n}"
        for n, joined in enumerate(rejoined):
            assert text_of(joined.result()) == f"You said: warm {n}You said: more"
            assert joined.result()[-1]["status"] == "completed"
        for question in ("still here?", "and again?"):
            frames = await asked_once(stayed, question)
            assert frames[-1].get("status") == "completed", frames[-1]
            assert text_of(frames) == f"You said: {question}"


async def test_no_pooled_connection_that_outlived_a_redis_restart_fails_a_request(
    lone_redis: Redis, fake: FakeUpstream
) -> None:
    """Each of a worker's Redis clients (leases and frames, the tail's reader, the rate
    limits) serves at once, and on every connection it had, once Redis is back."""
    settings = fake_settings(
        fake, chat_redis_url=lone_redis.url, chat_quota_questions="1000/second"
    )
    cluster = Cluster(lone_redis.url)
    tail = Tail(cluster)
    quotas = Quotas(settings, cluster.redis, Metrics())
    busy = 20

    async def use_every_pool() -> None:
        # Requests sent together, so that each pool opens a connection for every one of them.
        await asyncio.gather(
            *(cluster.redis.blpop([f"nothing:{n}"], timeout=0.05) for n in range(busy)),
            *(tail.redis.blpop([f"nothing:{n}"], timeout=0.05) for n in range(busy)),
            *(quotas.check(f"user:{n}") for n in range(busy)),
        )

    try:
        await use_every_pool()
        await asyncio.to_thread(lone_redis.stop)
        await asyncio.to_thread(lone_redis.start)
        await use_every_pool()
    finally:
        await quotas.close()
        await tail.redis.aclose()
        await cluster.redis.aclose()


async def test_sockets_that_leave_while_redis_is_down_log_a_warning_each(outage: Outage) -> None:
    workers = outage.workers
    async with connect(workers[0].ws) as ws:
        assert (await ask(ws, "before"))[-1]["status"] == "completed"
        asked = conversation_of(ws)
    # New conversations, and one in which something was asked, on both workers.
    urls = [workers[0].ws, workers[1].ws, f"{workers[1].ws}?conversation={asked}"]
    async with contextlib.AsyncExitStack() as sockets:
        for url in urls:
            await sockets.enter_async_context(connect(url))
        before = outage.logs()
        await asyncio.to_thread(outage.redis.stop)
    try:
        await asyncio.sleep(UNIT / 2)  # the workers have told Redis, or tried to, by then
        logged = outage.logged_since(before)
    finally:
        await asyncio.to_thread(outage.redis.start)
    assert "never retrieved" not in logged
    assert "Traceback" not in logged
    left = [line for line in logged.splitlines() if "clients left" in line]
    assert len(left) == len(urls)
    assert all(" WARNING " in line for line in left)


async def close_of_join(url: str) -> tuple[int, str]:
    """How the server closes a socket that names a conversation (it must, and soon)."""
    async with ws_connect(url) as ws:
        return await close_of(ws, within=UNIT)


async def joins_are_refused_while(
    outage: Outage, stop: Callable[[], None], start: Callable[[], None]
) -> None:
    """Between `stop` and `start`, a socket naming a conversation (in memory on one worker,
    not on the other) is closed with 1013 at once; after, both workers serve it whole."""
    workers = outage.workers
    async with connect(workers[0].ws) as ws:
        conversation = conversation_of(ws)
        assert (await ask(ws, "remember me"))[-1]["status"] == "completed"
    await asyncio.to_thread(stop)
    try:
        for worker in workers:
            code, reason = await close_of_join(f"{worker.ws}?conversation={conversation}")
            assert code == 1013
            assert "try again" in reason
    finally:
        await asyncio.to_thread(start)
    said = ["You said: remember me"]
    for worker in workers:
        async with connect_once_back(f"{worker.ws}?conversation={conversation}") as ws:
            history: list[Frame] = []
            for _ in said:
                history += await until_end(ws, within=UNIT)
            assert text_of(history) == "".join(said)
            again = await ask(ws, "again")
            assert again[-1]["status"] == "completed"
            said.append(text_of(again))
    assert said[1:] == ["You said: again"] * len(workers)


@contextlib.asynccontextmanager
async def connect_once_back(url: str) -> AsyncIterator[ClientConnection]:
    """`connect`, tried again for up to `UNIT` s while the server answers 1013: a database
    that listens again is still starting up for a moment."""
    async with contextlib.AsyncExitStack() as stack:
        async with asyncio.timeout(UNIT):
            while True:
                try:
                    ws = await stack.enter_async_context(connect(url))
                    break
                except ConnectionClosed as closed:
                    if closed.rcvd is None or closed.rcvd.code != 1013:
                        raise
                await asyncio.sleep(0.1)
        yield ws


async def test_joining_while_redis_is_down_is_refused_with_1013(outage: Outage) -> None:
    await joins_are_refused_while(outage, outage.redis.stop, outage.redis.start)


async def test_joining_while_postgres_is_down_is_refused_with_1013(
    outage: Outage, postgres: Postgres
) -> None:
    await joins_are_refused_while(outage, postgres.stop, postgres.start)


async def read_until_end(ws: ClientConnection, frames: list[Frame]) -> list[Frame]:
    """Frames into `frames` up to the bot's `end`; `frames` too."""
    async with asyncio.timeout(UNIT * 10):
        while not frames or frames[-1]["type"] != "end":
            frames.append(await recv(ws, within=UNIT * 5))
    return frames


async def follow_to_the_end(url: str) -> list[Frame]:
    async with connect(url) as ws:
        return await read_until_end(ws, [])


@pytest.mark.parametrize("restart", ["crash", "stop"])
async def test_a_reply_streaming_across_a_redis_restart_goes_on_to_its_end(
    outage: Outage, fake: FakeUpstream, restart: str
) -> None:
    """Redis comes back while the reply still streams (a crash and a quick restart) or after
    it has ended (a slower stop): either way it ends as it would have, for every client."""
    runner, other = outage.workers
    words = [f" w{n}" for n in range(300)]
    fake.then(Behaviour(tokens=words, delay=0.01))
    async with connect(runner.ws) as asker:
        conversation = conversation_of(asker)
        async with connect(f"{other.ws}?conversation={conversation}") as follower:
            await asker.send("a long story")
            asked: list[Frame] = []
            while len(text_of(asked)) < 40:
                asked.append(await recv(asker))
            restarting = outage.crash_redis if restart == "crash" else outage.restart_redis
            await asyncio.to_thread(restarting)
            async with asyncio.TaskGroup() as group:
                # Clients that come once Redis is back, on either worker.
                late = [
                    group.create_task(follow_to_the_end(f"{worker.ws}?conversation={conversation}"))
                    for worker in (runner, other)
                ]
                await read_until_end(asker, asked)
                followed = await read_until_end(follower, [])
    for frames in (asked, followed, *(task.result() for task in late)):
        assert [f["type"] for f in frames if f["type"] in ("error", "end")] == ["end"]
        assert frames[-1]["status"] == "completed"
        assert text_of(frames) == "".join(words)
        assert [f["seq"] for f in frames] == sorted({f["seq"] for f in frames})
    # And clients that come after the end, on either worker.
    for worker in (runner, other):
        async with connect(f"{worker.ws}?conversation={conversation}") as ws:
            frames = await until_end(ws, within=UNIT)
            assert text_of(frames) == "".join(words)
            assert frames[-1]["status"] == "completed"
