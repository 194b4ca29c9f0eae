"""`GET /metrics`: the values after a scripted session, who may read them, and one view of
all the workers of `python -m backend --workers N`."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack

import httpx
from prometheus_client.parser import text_string_to_metric_families

from backend.process.server import free_port
from deploy.services import Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    Frame,
    ask,
    backend_process,
    connect,
    conversation_of,
    healthy,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(base: str, **headers: str) -> Samples:
    async with httpx.AsyncClient(base_url=base) as client:
        response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def spent(frames: list[Frame]) -> tuple[int, int]:
    usage = frames[-1]["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


async def test_metrics_after_a_scripted_session(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_quota_questions="3/minute")
    with live_server(settings) as server:
        empty = await scrape(server.http)
        assert value(empty, "chat_replies_total", status="completed") == 0
        async with connect(server.ws) as ws:
            during = await scrape(server.http)
            assert value(during, "chat_open_connections", kind="websocket") == 1
            completed = await ask(ws, "hello")
            # A stop.
            fake.then(Behaviour(tokens=["slow "] * 200, delay=0.02))
            await ws.send(json.dumps({"type": "question", "message": "long"}))
            stopped = [await until_reply_text(ws)]
            await ws.send(json.dumps({"type": "stop"}))
            stopped += await until_end(ws)
            # An upstream error (tried twice, as every 5xx before the first token).
            fake.then(Behaviour(status=503), Behaviour(status=503))
            failed = await ask(ws, "fails")
            assert failed[-2]["code"] == "upstream_unavailable"
            # A quota refusal: the fourth question this minute.
            await ws.send(json.dumps({"type": "question", "message": "one too many"}))
            assert (await recv(ws))["code"] == "rate_limited"
            conversation = conversation_of(ws)
            last_seq = stopped[-1]["seq"]
        # A resume.
        async with connect(f"{server.ws}?conversation={conversation}&after={last_seq}") as ws:
            await until_end(ws)  # what came after: the failed reply
        async with asyncio.timeout(UNIT):
            while True:
                after = await scrape(server.http)
                if value(after, "chat_open_connections", kind="websocket") == 0:
                    break
                await asyncio.sleep(0.05)

    assert value(after, "chat_replies_total", status="completed") == 1
    assert value(after, "chat_replies_total", status="interrupted") == 1
    assert value(after, "chat_replies_total", status="error") == 1
    assert value(after, "chat_upstream_errors_total", code="upstream_unavailable") == 1
    assert value(after, "chat_resumes_total") == 1
    assert value(after, "chat_quota_refusals_total", limit="questions") == 1
    # Time to first token: the two replies that had one.
    assert value(after, "chat_time_to_first_token_seconds_count") == 2
    assert 0 < value(after, "chat_time_to_first_token_seconds_sum") < UNIT
    # Stop to end, quickly.
    assert value(after, "chat_stop_to_end_seconds_count") == 1
    assert value(after, "chat_stop_to_end_seconds_sum") < 0.5
    assert value(after, "chat_stop_to_end_seconds_bucket", le="0.5") == 1
    # Every piece of text relayed, and every token the replies took.
    pieces = 3 + text_of(stopped).count("slow")  # "You said: hello" is three tokens
    assert value(after, "chat_tokens_relayed_total") == pieces
    prompt = spent(completed)[0] + spent(stopped)[0]
    completion = spent(completed)[1] + spent(stopped)[1]
    assert value(after, "chat_model_tokens_total", kind="prompt") == prompt
    assert value(after, "chat_model_tokens_total", kind="completion") == completion


async def test_metrics_need_their_token_when_one_is_set(upstream_server: FakeUpstream) -> None:
    with live_server(fake_settings(upstream_server, chat_metrics_token="m-0123456789")) as server:
        async with httpx.AsyncClient(base_url=server.http) as client:
            for given in ({}, {"Authorization": "Bearer wrong"}):
                refused = await client.get("/metrics", headers=given)
                assert refused.status_code == 401
                assert "CHAT_METRICS_TOKEN" in refused.json()["detail"]
        await scrape(server.http, Authorization="Bearer m-0123456789")


async def test_metrics_without_a_token_are_for_this_machine_only(
    upstream_server: FakeUpstream,
) -> None:
    with live_server(fake_settings(upstream_server)) as server:
        await scrape(server.http)
        # Through a proxy on this machine, for a client elsewhere.
        async with httpx.AsyncClient(base_url=server.http) as client:
            for forwarded in (
                {"X-Forwarded-For": "203.0.113.9"},
                # RFC 7239, which uvicorn does not read: any hop elsewhere makes it remote.
                {"Forwarded": "for=203.0.113.9"},
                {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'},
                {"Forwarded": "for=127.0.0.1, for=198.51.100.7"},
                {"Forwarded": "for=unknown"},
                {"Forwarded": "For = 198.51.100.7"},
                {"X-Real-IP": "198.51.100.7"},
            ):
                refused = await client.get("/metrics", headers=forwarded)
                assert refused.status_code == 403, forwarded
                assert "CHAT_METRICS_TOKEN" in refused.json()["detail"]
            local = await client.get("/metrics", headers={"Forwarded": 'for="[::1]:5000"'})
            assert local.status_code == 200


async def test_every_worker_reports_all_of_them(
    fake: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    port = free_port()
    env = {
        "OPENAI_BASE_URL": fake.url,
        "CHAT_MODEL": "fake-model",
        "CHAT_DATABASE_URL": postgres.database(),
        "CHAT_REDIS_URL": redis_server.url,
    }
    sockets = 8
    async with backend_process(port, "--workers", "2", **env):
        base = f"http://127.0.0.1:{port}"
        await healthy(base)
        async with AsyncExitStack() as stack:
            # Held open at once, so the kernel hands them to both workers.
            opened = [
                await stack.enter_async_context(connect(f"ws://127.0.0.1:{port}/chat"))
                for _ in range(sockets)
            ]
            for ws in opened:
                await ask(ws, "counted")
            # Whichever worker answers the scrape reports the replies of both.
            for _ in range(6):
                samples = await scrape(base)
                assert value(samples, "chat_replies_total", status="completed") == sockets
                assert value(samples, "chat_open_connections", kind="websocket") == sockets
