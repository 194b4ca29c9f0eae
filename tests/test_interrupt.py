"""Stop, pre-emption, reset and disconnect: the reply ends at once and the model stops too."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    Frame,
    LiveServer,
    ask,
    bare,
    connect,
    live_server,
    recv,
    text_of,
    until_end,
    wait_hung_up,
)

SLOW = Behaviour(tokens=[f" t{i}" for i in range(200)], delay=0.02)


async def read_some_tokens(ws: ClientConnection, count: int) -> list[Frame]:
    """Frames of the current reply until at least `count` characters of bot text arrived."""
    frames: list[Frame] = []
    while len(text_of(frames)) < count:
        frames.append(await recv(ws))
    return frames


async def test_stop_ends_reply_closes_upstream_and_keeps_partial(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(SLOW)
    async with connect(server.ws) as ws:
        await ws.send(json.dumps({"type": "question", "message": "count"}))
        seen = await read_some_tokens(ws, 12)
        await ws.send(json.dumps({"type": "stop"}))
        rest = await until_end(ws)
        usage = rest[-1].pop("usage")
        assert bare(rest[-1]) == {
            "sender": "bot",
            "message": "",
            "type": "end",
            "status": "interrupted",
        }
        # The model never said what the stopped reply cost: the server counted it.
        assert usage["estimated"] is True
        assert usage["prompt_tokens"] > 0
        assert usage["completion_tokens"] > 0
        assert all(f["type"] == "stream" for f in rest[:-1])
        shown = text_of(seen + rest)
        # Nothing of that reply follows its end, although the model had 150+ tokens to go.
        with pytest.raises(TimeoutError):
            await recv(ws, within=0.3)
        await wait_hung_up(fake, 0)
        assert fake.requests[0].tokens_sent < 100

        fake.then(Behaviour(tokens=["ok"]))
        await ask(ws, "next")
    history = fake.requests[1].messages
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user"]
    assert history[2]["content"] == shown
    assert shown.startswith(" t0 t1")


async def test_stop_without_reply_is_an_info(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        await ws.send(json.dumps({"type": "stop"}))
        frame = await recv(ws)
        assert frame["type"] == "info"
        assert "nothing to stop" in frame["message"]
        with pytest.raises(TimeoutError):
            await recv(ws, within=0.2)
    assert fake.requests == []


async def test_question_preempts_reply_in_progress(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(SLOW, Behaviour(tokens=["second", " answer"]))
    async with connect(server.ws) as ws:
        await ws.send(json.dumps({"type": "question", "message": "first"}))
        seen = await read_some_tokens(ws, 6)
        await ws.send(json.dumps({"type": "question", "message": "second"}))
        rest = await until_end(ws)
        assert rest[-1]["status"] == "interrupted"
        shown = text_of(seen + rest)
        following = await until_end(ws)
    assert bare(following[0]) == {"sender": "you", "message": "second", "type": "stream"}
    assert following[-1]["status"] == "completed"
    assert text_of(following) == "second answer"
    await wait_hung_up(fake, 0)
    history = fake.requests[1].messages
    assert [m["content"] for m in history[1:]] == ["first", shown, "second"]


async def test_reset_interrupts_and_forgets(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        await ask(ws, "remember me")
        fake.then(SLOW)
        await ws.send(json.dumps({"type": "question", "message": "slow one"}))
        await read_some_tokens(ws, 3)
        await ws.send(json.dumps({"type": "reset"}))
        ended = await until_end(ws)
        assert ended[-1]["status"] == "interrupted"
        ack = await recv(ws)
        assert ack["type"] == "info"
        assert "cleared" in ack["message"]
        await ask(ws, "fresh start")
    await wait_hung_up(fake, 1)
    assert [m["role"] for m in fake.requests[2].messages] == ["system", "user"]


async def test_reset_when_idle_is_acknowledged(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        await ask(ws, "one")
        await ws.send(json.dumps({"type": "reset"}))
        ack = await recv(ws)
        assert (ack["type"], ack["sender"]) == ("info", "bot")
        await ask(ws, "two")
    assert [m["role"] for m in fake.requests[1].messages] == ["system", "user"]


@pytest.fixture(scope="module")
def no_grace(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    """A server that stops a reply as soon as its last client leaves (no resume grace)."""
    with live_server(fake_settings(upstream_server, chat_resume_grace=0)) as live:
        yield live


async def test_disconnect_mid_reply_closes_upstream(
    no_grace: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" x"] * 500, delay=0.02))
    async with connect(no_grace.ws) as ws:
        await ws.send("go on forever")
        await read_some_tokens(ws, 4)
        closed_at = time.monotonic()
    record = (await fake.arrived(1))[0]
    await wait_hung_up(fake, 0, within=1.0)
    assert record.hung_up_at is not None
    assert record.hung_up_at - closed_at < 1.0
    assert not record.completed


async def test_disconnect_before_first_token_closes_upstream(
    no_grace: LiveServer, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(first_delay=UNIT * 2))
    async with connect(no_grace.ws) as ws:
        await ws.send("slow to start")
        await recv(ws)  # the echo
        await fake.arrived(1)
    await wait_hung_up(fake, 0, within=1.0)


async def test_stop_always_lands_while_tokens_pour_in(
    server: Addressed, fake: FakeUpstream
) -> None:
    """A stop racing a token that arrives at the same instant must still end the reply."""
    fake.default = Behaviour(tokens=[" r"] * 100_000, delay=0.002)
    async with connect(server.ws) as ws:
        for trial in range(60):
            await ws.send(f"race {trial}")
            await read_some_tokens(ws, 2 + trial % 7)
            await ws.send(json.dumps({"type": "stop"}))
            ended = await until_end(ws, within=UNIT)
            assert ended[-1]["status"] == "interrupted", f"trial {trial}"
            await ws.send(json.dumps({"type": "reset"}))
            assert (await recv(ws))["type"] == "info"
    for record in fake.requests:
        await wait_hung_up(fake, fake.requests.index(record))
