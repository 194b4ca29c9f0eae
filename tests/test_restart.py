"""Server restarts lose nothing: draining on SIGTERM, and at most ~1 s of text on SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from backend.process.server import free_port
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    UNIT,
    Frame,
    backend_process,
    close_of,
    connect,
    conversation_of,
    recv,
    temp_database,
    text_of,
    until_end,
    wait_hung_up,
)

TOKEN_DELAY = 0.01
WORDS = [f" w{n}" for n in range(3000)]


class Served(Addressed):
    """`python -m backend` on a port of its own, with a database that outlives it."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    async def health(self) -> httpx.Response:
        async with httpx.AsyncClient(timeout=UNIT) as client:
            return await client.get(f"{self.http}/healthz")


@asynccontextmanager
async def served(fake: FakeUpstream, database: str, **env: str) -> AsyncIterator[Served]:
    """The server as its own process until the block ends (or a test stops it)."""
    port = free_port()
    settings = {"OPENAI_BASE_URL": fake.url, "CHAT_MODEL": "fake-model", **env}
    async with backend_process(port, CHAT_DATABASE_URL=database, **settings) as process:
        server = Served(process, port)
        async with asyncio.timeout(UNIT * 10):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await server.health()).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield server


async def read_text(ws: ClientConnection, chars: int) -> list[Frame]:
    frames: list[Frame] = []
    while len(text_of(frames)) < chars:
        frames.append(await recv(ws))
    return frames


async def stored(server: Served, conversation: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/api/conversations/{conversation}")
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()["messages"][-1]
    return reply


async def test_sigterm_lets_a_short_reply_finish_then_closes_with_1012(
    fake: FakeUpstream,
) -> None:
    database = temp_database()
    fake.then(Behaviour(tokens=WORDS[:60], delay=TOKEN_DELAY))
    async with served(fake, database) as server:
        async with connect(server.ws) as ws:
            conversation = conversation_of(ws)
            await ws.send("a short story")
            frames = await read_text(ws, 10)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            draining = await server.health()
            assert draining.status_code == 503
            assert draining.json()["status"] == "draining"
            await ws.send("one more, please")
            frames += await until_end(ws)
            assert await close_of(ws) == (
                1012,
                "The server is restarting; reconnect to resume the conversation.",
            )
        async with asyncio.timeout(UNIT * 5):
            await server.process.wait()
    assert frames[-1]["status"] == "completed"
    assert text_of(frames) == "".join(WORDS[:60])
    # A question while draining is turned away with a clear error, and the reply goes on.
    refused = [f for f in frames if f["type"] == "error"]
    assert [f["code"] for f in refused] == ["shutting_down"]
    assert "seq" not in refused[0]
    async with served(fake, database) as server:
        async with ws_connect(
            f"{server.ws}?conversation={conversation}&after={frames[-1]['seq']}"
        ) as ws:
            assert (await recv(ws))["conversation"] == conversation
            again = await ask_next(ws)
        reply = await stored(server, conversation)
    assert again[0]["seq"] > frames[-1]["seq"]
    assert reply["status"] == "completed"
    # The restarted server sent the model the turn from before the restart.
    history = [m["content"] for m in fake.requests[-1].messages[1:]]
    assert history == ["a short story", "".join(WORDS[:60]), "and then?"]


async def ask_next(ws: ClientConnection) -> list[Frame]:
    await ws.send("and then?")
    return await until_end(ws)


async def test_sigterm_stores_a_long_reply_as_interrupted_and_the_client_resumes(
    fake: FakeUpstream,
) -> None:
    database = temp_database()
    fake.then(Behaviour(tokens=WORDS, delay=TOKEN_DELAY))
    async with served(fake, database, CHAT_SHUTDOWN_GRACE="0.5") as server:
        async with connect(server.ws) as ws:
            conversation = conversation_of(ws)
            await ws.send("a long story")
            frames = await read_text(ws, 10)
            server.process.send_signal(signal.SIGTERM)
            frames += await until_end(ws, within=UNIT * 3)
            assert (await close_of(ws))[0] == 1012
        await wait_hung_up(fake, 0, within=UNIT * 2)
    assert frames[-1]["status"] == "interrupted"
    async with served(fake, database) as server:
        reply = await stored(server, conversation)
        async with ws_connect(f"{server.ws}?conversation={conversation}") as ws:
            await recv(ws)
            replayed = await until_end(ws)
    assert reply["status"] == "interrupted"
    assert reply["text"] == text_of(frames)
    assert text_of(replayed) == text_of(frames)


async def test_sigkill_loses_at_most_about_a_second_of_text(fake: FakeUpstream) -> None:
    database = temp_database()
    fake.then(Behaviour(tokens=WORDS, delay=TOKEN_DELAY))
    async with served(fake, database) as server, connect(server.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a long story")
        # Long enough for several writes, then a kill at a random moment between two.
        frames = await read_text(ws, 1500)
        server.process.kill()
        with contextlib.suppress(Exception):
            while True:
                frames.append(await recv(ws, within=UNIT))
    seen = text_of(frames)
    async with served(fake, database) as server:
        reply = await stored(server, conversation)
        after = max(f["seq"] for f in frames if "seq" in f)
        async with ws_connect(f"{server.ws}?conversation={conversation}&after={after}") as ws:
            await recv(ws)
            end = await recv(ws)
    assert reply["status"] == "interrupted"
    assert seen.startswith(reply["text"])
    lost_tokens = seen[len(reply["text"]) :].count(" w")
    # Written every second; the kill lands anywhere in that second, on a loaded machine.
    assert lost_tokens * TOKEN_DELAY <= 1.5, (lost_tokens, len(seen))
    # Numbering goes on past anything the killed process may have sent unstored.
    assert end["type"] == "end"
    assert end["status"] == "interrupted"
    assert end["seq"] > after
