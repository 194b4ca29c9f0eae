"""Quotas: each limit refuses with `rate_limited` (or HTTP 429 + Retry-After), leaves the
conversation as it was, and lets the caller in again once the window has passed or a slot has
freed; per user, per client address without auth, and across workers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from deploy.services import Deployment, Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import deployment_env, fake_settings
from tests.harness import (
    UNIT,
    LiveServer,
    ask,
    connect,
    conversation_of,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
)
from tests.test_auth import SECRET, headers, token

SLOW = Behaviour(tokens=["slow "] * 200, delay=0.05)  # stopped long before its end


@pytest.fixture
def limited(upstream_server: FakeUpstream, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A server with the quotas a test's `limits` marker gives (auth off: per address)."""
    marker = request.node.get_closest_marker("limits")
    assert marker is not None, "say which quotas with @pytest.mark.limits(...)"
    with live_server(fake_settings(upstream_server, **marker.kwargs)) as server:
        yield server


async def refused(ws: ClientConnection, question: str) -> dict[str, Any]:
    """Ask, and expect a `rate_limited` error for this socket alone, with nothing else."""
    await ws.send(json.dumps({"type": "question", "message": question}))
    frame = await recv(ws)
    assert frame["type"] == "error", frame
    assert frame["code"] == "rate_limited"
    assert "seq" not in frame  # not part of the conversation
    return frame


async def handshake_status(url: str, credential: str | None = None) -> tuple[int, str | None]:
    with pytest.raises(InvalidStatus) as refusal:
        async with ws_connect(url, additional_headers=headers(credential)):
            pass
    response = refusal.value.response
    return response.status_code, response.headers.get("Retry-After")


async def connect_when_free(url: str, within: float = UNIT, **options: Any) -> ClientConnection:
    """A socket, once the server has freed a connection slot (it frees one as it notices a
    client has gone, a moment after the client closed)."""
    async with asyncio.timeout(within):
        while True:
            try:
                ws = await ws_connect(url, **options)
            except InvalidStatus as refusal:
                if refusal.response.status_code != 429:
                    raise
                await asyncio.sleep(0.05)
                continue
            assert (await recv(ws))["type"] == "info"  # its conversation
            return ws


@pytest.mark.limits(chat_quota_questions="2 per 2 seconds")
async def test_questions_per_window(limited: LiveServer, fake: FakeUpstream) -> None:
    async with connect(limited.ws) as ws:
        await ask(ws, "one")
        await ask(ws, "two")
        frame = await refused(ws, "three")
        assert "2 questions per 2 seconds" in frame["message"]
        assert 0 < frame["retry_after"] <= 2
        assert "in 1 second" in frame["message"] or "in 2 seconds" in frame["message"]
        # Regenerating is asking again: refused too.
        await ws.send(json.dumps({"type": "regenerate"}))
        assert (await recv(ws))["code"] == "rate_limited"
        # The stream routes count the same questions, and say when with Retry-After.
        async with httpx.AsyncClient(base_url=limited.http) as client:
            response = await client.get("/stream", params={"prompt": "four"})
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 2
        assert "questions per 2 seconds" in response.json()["detail"]
        # The socket is still open, and the refused questions are nowhere.
        await asyncio.sleep(frame["retry_after"] + 0.1)
        frames = await ask(ws, "five")
        assert text_of(frames) == "You said: five"
        sent = fake.requests[-1].messages
        assert [m["content"] for m in sent if m["role"] == "user"] == ["one", "two", "five"]
        conversation = conversation_of(ws)
    async with httpx.AsyncClient(base_url=limited.http) as client:
        stored = (await client.get(f"/api/conversations/{conversation}")).json()
    questions = [m["text"] for m in stored["messages"] if m["role"] == "user"]
    assert questions == ["one", "two", "five"]


@pytest.mark.limits(chat_quota_replies=1)
async def test_replies_at_once(limited: LiveServer, fake: FakeUpstream) -> None:
    async with connect(limited.ws) as first, connect(limited.ws) as second:
        fake.then(SLOW, SLOW)
        await first.send(json.dumps({"type": "question", "message": "long"}))
        await until_reply_text(first)
        frame = await refused(second, "another conversation")
        assert "1 reply in progress" in frame["message"]
        assert "retry_after" not in frame  # it frees when that reply ends, whenever that is
        async with httpx.AsyncClient(base_url=limited.http) as client:
            response = await client.get("/sse", params={"prompt": "and another"})
            assert response.status_code == 429
            assert response.headers["Retry-After"] == "5"
        # A question in the same conversation pre-empts its reply and takes its place.
        await first.send(json.dumps({"type": "question", "message": "instead"}))
        assert (await until_end(first))[-1]["status"] == "interrupted"
        await until_reply_text(first)
        await first.send(json.dumps({"type": "stop"}))
        assert (await until_end(first))[-1]["status"] == "interrupted"
        # Once no reply runs, the other conversation may ask.
        assert text_of(await ask(second, "my turn")) == "You said: my turn"
        async with httpx.AsyncClient(base_url=limited.http) as client:
            assert (await client.get("/stream", params={"prompt": "now"})).status_code == 200


@pytest.mark.limits(chat_quota_connections=2)
async def test_connections_at_once(limited: LiveServer, fake: FakeUpstream) -> None:
    async with connect(limited.ws) as first:
        await ask(first, "hello")
        conversation = conversation_of(first)
        async with httpx.AsyncClient(base_url=limited.http) as client:
            async with client.stream("GET", "/sse", params={"conversation": conversation}):
                status, retry_after = await handshake_status(limited.ws)
                assert (status, retry_after) == (429, "5")
                joined = await client.get("/sse", params={"conversation": conversation})
                assert joined.status_code == 429
                assert "2 connections open" in joined.json()["detail"]
                # A refused connection takes nothing: the open ones work on.
                assert text_of(await ask(first, "still here")) == "You said: still here"
            # The stream has closed: its slot is free again once the server has seen it go.
            async with await connect_when_free(limited.ws) as second:
                await ask(second, "in")


@pytest.mark.limits(chat_quota_tokens="40 per 3 seconds")
async def test_model_tokens_per_window(limited: LiveServer, fake: FakeUpstream) -> None:
    async with connect(limited.ws) as ws:
        # The fake reports a prompt token per word sent (17 in the system prompt).
        first = await ask(ws, "one two three")
        assert first[-1]["usage"] == {
            "prompt_tokens": 20,
            "completion_tokens": 5,
            "estimated": False,
        }
        await ask(ws, "under the limit still")  # 25 spent before it: allowed, and overspends
        frame = await refused(ws, "over")
        assert "40 model tokens per 3 seconds" in frame["message"]
        assert 0 < frame["retry_after"] <= 3
        await asyncio.sleep(frame["retry_after"] + 0.1)
        assert text_of(await ask(ws, "again")) == "You said: again"
        conversation = conversation_of(ws)
    # Each reply's usage is stored with its turn.
    async with httpx.AsyncClient(base_url=limited.http) as client:
        stored = (await client.get(f"/api/conversations/{conversation}")).json()
    replies = [m for m in stored["messages"] if m["role"] == "assistant"]
    assert replies[0]["usage"] == first[-1]["usage"]
    assert [reply["usage"]["completion_tokens"] for reply in replies] == [5, 6, 3]


@pytest.mark.limits(chat_quota_tokens="60 per 3 seconds")
async def test_unreported_and_stopped_replies_are_counted_by_us(
    limited: LiveServer, fake: FakeUpstream
) -> None:
    async with connect(limited.ws) as ws:
        fake.then(Behaviour(tokens=["word "] * 40, usage=False))
        frames = await ask(ws, "no usage from this server")
        usage = frames[-1]["usage"]
        assert usage["estimated"] is True
        assert usage["prompt_tokens"] > 17  # the system prompt and the question, estimated
        assert usage["completion_tokens"] >= 40
        # Already over the window's 60: the next question waits, stopped replies included.
        await refused(ws, "and now?")
    with live_server(fake_settings(fake, chat_quota_tokens="30 per 3 seconds")) as server:
        async with connect(server.ws) as ws:
            fake.then(SLOW)
            await ws.send(json.dumps({"type": "question", "message": "long"}))
            await until_reply_text(ws)
            await asyncio.sleep(0.5)
            await ws.send(json.dumps({"type": "stop"}))
            end = (await until_end(ws))[-1]
            assert end["status"] == "interrupted"
            assert end["usage"]["estimated"] is True
            assert end["usage"]["completion_tokens"] > 0
            await refused(ws, "more")


async def test_quotas_are_per_user(upstream_server: FakeUpstream, fake: FakeUpstream) -> None:
    settings = fake_settings(
        upstream_server,
        chat_auth="token",
        chat_jwt_secret=SECRET,
        chat_quota_questions="1 per 5 seconds",
        chat_quota_connections=1,
    )
    alice, bob = token("alice"), token("bob")
    with live_server(settings) as server:
        async with connect(server.ws, additional_headers=headers(alice)) as ws:
            await ask(ws, "alice asks")
            await refused(ws, "alice asks again")
            assert await handshake_status(server.ws, alice) == (429, "5")
            # Bob, from the same address, has quotas of his own.
            async with connect(server.ws, additional_headers=headers(bob)) as other:
                assert text_of(await ask(other, "bob asks")) == "You said: bob asks"


async def test_quotas_hold_across_workers(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    env = {
        **deployment_env(upstream_server, postgres, redis_server),
        "CHAT_AUTH": "token",
        "CHAT_JWT_SECRET": SECRET,
        "CHAT_QUOTA_QUESTIONS": "3 per 3 seconds",
        "CHAT_QUOTA_TOKENS": "200 per 5 seconds",
        "CHAT_QUOTA_REPLIES": "1",
        "CHAT_QUOTA_CONNECTIONS": "2",
    }
    deployed = Deployment(2, env).start()
    try:
        one, two = (f"ws://127.0.0.1:{worker.port}/chat" for worker in deployed.workers)
        # Questions: three on one worker use up the window on the other.
        carol = token("carol")
        async with connect(one, additional_headers=headers(carol)) as ws:
            for question in ("first", "second", "third"):
                await ask(ws, question)
        async with connect(two, additional_headers=headers(carol)) as ws:
            frame = await refused(ws, "fourth")
            assert "questions per 3 seconds" in frame["message"]
            await asyncio.sleep(frame["retry_after"] + 0.1)
            await ask(ws, "after the window")
        # Model tokens: what replies on one worker spent counts on the other.
        erin, wordy = token("erin"), " ".join(["word"] * 150)
        upstream_server.then(Behaviour(tokens=["ok"]), Behaviour(tokens=["ok"]))
        async with connect(one, additional_headers=headers(erin)) as ws:
            assert (await ask(ws, wordy))[-1]["usage"]["prompt_tokens"] > 150
        async with connect(two, additional_headers=headers(erin)) as ws:
            await ask(ws, wordy)  # 168 of 200 spent before it: allowed
        async with connect(one, additional_headers=headers(erin)) as ws:
            frame = await refused(ws, "one more")
            assert "200 model tokens per 5 seconds" in frame["message"]
        # Replies at once: a reply on one worker holds the user's only slot on the other.
        dave = token("dave")
        async with (
            connect(one, additional_headers=headers(dave)) as first,
            connect(two, additional_headers=headers(dave)) as second,
        ):
            upstream_server.then(SLOW)
            await first.send(json.dumps({"type": "question", "message": "long"}))
            await until_reply_text(first)
            await refused(second, "meanwhile")
            # Connections: dave has two open, one on each worker; a third is refused by both.
            assert (await handshake_status(one, dave))[0] == 429
            assert (await handshake_status(two, dave))[0] == 429
            await first.send(json.dumps({"type": "stop"}))
            assert (await until_end(first, UNIT * 3))[-1]["status"] == "interrupted"
            assert text_of(await ask(second, "now me")) == "You said: now me"
        # Both sockets closed: their slots are free on every worker.
        for url in (one, two, one):
            async with await connect_when_free(url, additional_headers=headers(dave)):
                pass
    finally:
        deployed.remove()


def test_a_rate_that_cannot_be_read_stops_the_server_from_starting(
    upstream_server: FakeUpstream,
) -> None:
    with pytest.raises(ValueError, match="is not a rate"):
        fake_settings(upstream_server, chat_quota_questions="ten a minute")
