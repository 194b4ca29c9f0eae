"""The server's own log: JSON lines on request, the conversation and reply on every line of a
reply, and never a question's text."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import jwt

from backend.process.server import free_port
from deploy.services import environment_without_settings
from fakes.openai_server import FakeUpstream
from tests.harness import (
    UNIT,
    ask,
    connect,
    conversation_of,
    healthy,
    python_process,
    recv,
    temp_database,
)

SECRET = "tell-nobody-7431"


async def served_log(fake: FakeUpstream, log_format: str) -> tuple[str, str]:
    """Run `python -m backend`, ask over a socket and over `/stream`, stop it: the
    conversation id and everything it logged."""
    port = free_port()
    env = environment_without_settings()
    env.update(
        OPENAI_BASE_URL=fake.url,
        CHAT_MODEL="fake-model",
        CHAT_DATABASE_URL=temp_database(),
        CHAT_LOG_FORMAT=log_format,
    )
    async with python_process(
        "-m", "backend", "--port", str(port), env=env, stderr=asyncio.subprocess.PIPE
    ) as server:
        base = f"http://127.0.0.1:{port}"
        await healthy(base)
        async with httpx.AsyncClient(timeout=UNIT) as client:
            async with connect(f"ws://127.0.0.1:{port}/chat") as ws:
                conversation = conversation_of(ws)
                await ask(ws, f"socket {SECRET}")
            streamed = await client.get(f"{base}/stream", params={"prompt": f"http {SECRET}"})
            assert streamed.status_code == 200
        server.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(server.communicate(), UNIT * 10)
    return conversation, err.decode()


async def test_json_lines_name_the_conversation_and_reply_and_keep_questions_out(
    fake: FakeUpstream,
) -> None:
    conversation, log = await served_log(fake, "json")
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
    ended = [line for line in lines if line["message"].startswith("reply completed")]
    assert len(ended) == 2  # the socket's and the /stream request's
    assert ended[0]["conversation"] == conversation
    assert len({line["reply"] for line in ended}) == 2
    assert any("/stream" in line["message"] for line in lines)  # the request line, at INFO
    assert SECRET not in log


async def test_text_lines_carry_the_ids_too(fake: FakeUpstream) -> None:
    conversation, log = await served_log(fake, "text")
    ended = [line for line in log.splitlines() if "reply completed" in line]
    assert len(ended) == 2
    assert f"[conversation={conversation} reply=" in ended[0]
    assert SECRET not in log


async def test_credentials_and_questions_never_reach_the_log(fake: FakeUpstream) -> None:
    """Signed in, refused, rate limited, through tickets: the log names none of the secrets."""
    jwt_secret = "jwt-secret-that-is-long-enough-9d41"
    api_key = "sk-script-key-5521"
    metrics_token = "metrics-token-7770"
    bearer = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, jwt_secret, "HS256")
    port = free_port()
    env = environment_without_settings()
    env.update(
        OPENAI_BASE_URL=fake.url,
        CHAT_MODEL="fake-model",
        CHAT_DATABASE_URL=temp_database(),
        CHAT_LOG_FORMAT="json",
        CHAT_AUTH="token",
        CHAT_JWT_SECRET=jwt_secret,
        CHAT_API_KEYS=f"scripts:{api_key}",
        CHAT_METRICS_TOKEN=metrics_token,
        CHAT_QUOTA_QUESTIONS="1/minute",
    )
    async with python_process(
        "-m", "backend", "--port", str(port), env=env, stderr=asyncio.subprocess.PIPE
    ) as server:
        base = f"http://127.0.0.1:{port}"
        await healthy(base)
        signed = {"Authorization": f"Bearer {bearer}"}
        async with httpx.AsyncClient(base_url=base, timeout=UNIT) as client:
            ticket = (await client.post("/api/ws-ticket", headers=signed)).json()["ticket"]
            async with connect(f"ws://127.0.0.1:{port}/chat?ticket={ticket}") as ws:
                await ask(ws, f"socket {SECRET}")
                await ws.send(f"over the quota {SECRET}")
                assert (await recv(ws))["code"] == "rate_limited"
            # Refused: a used ticket, a forged token, a wrong metrics token.
            used = await client.get("/sse", params={"ticket": ticket, "prompt": SECRET})
            assert used.status_code == 401
            forged = {"Authorization": f"Bearer {bearer[:-4]}AAAA"}
            assert (await client.get("/api/conversations", headers=forged)).status_code == 401
            scripted = {"Authorization": f"Bearer {api_key}"}
            streamed = await client.get("/stream", params={"prompt": SECRET}, headers=scripted)
            assert streamed.status_code == 200
            metrics = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert metrics.status_code == 401
        server.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(server.communicate(), UNIT * 10)
    log = err.decode()
    assert "quota refused: questions" in log  # it did log what happened...
    for secret in (SECRET, jwt_secret, api_key, metrics_token, bearer, ticket):
        assert secret not in log  # ...and none of what was said or shown to prove who
