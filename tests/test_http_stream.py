"""`GET /stream` (chunked text), `GET /sse` (Server-Sent Events) and `GET /healthz`."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import UNIT, SettingsFactory, live_server, wait_hung_up


async def test_stream_flushes_each_token_as_it_arrives(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f"w{i} " for i in range(10)], delay=0.1))
    arrivals: list[tuple[float, str]] = []
    async with (
        httpx.AsyncClient(timeout=UNIT * 5) as client,
        client.stream("GET", f"{server.http}/stream", params={"prompt": "count"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        async for chunk in response.aiter_text():
            arrivals.append((time.monotonic(), chunk))
    text = "".join(chunk for _, chunk in arrivals)
    assert text == "".join(f"w{i} " for i in range(10)) + "\n"
    # Ten tokens 0.1 s apart: the first must not wait for the last.
    assert arrivals[-1][0] - arrivals[0][0] > 0.6
    assert len(arrivals) >= 8


async def test_stream_accepts_user_input(server: Addressed, fake: FakeUpstream) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/stream", params={"user_input": "hi there"})
    assert response.status_code == 200
    assert response.text == "You said: hi there\n"
    assert fake.requests[0].messages[-1] == {"role": "user", "content": "hi there"}


@pytest.mark.parametrize("path", ["/stream", "/sse"])
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "Missing question"),
        ({"prompt": ""}, "The question is empty"),
        ({"prompt": "   "}, "The question is empty"),
        ({"prompt": "q" * 16_001}, "the limit is 16,000"),
    ],
)
async def test_bad_prompt_is_422_with_reason(
    server: Addressed, fake: FakeUpstream, path: str, params: dict[str, str], expected: str
) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}{path}", params=params)
    assert response.status_code == 422
    assert expected in response.json()["detail"]
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/stream", "/sse"])
async def test_hangup_closes_upstream(server: Addressed, fake: FakeUpstream, path: str) -> None:
    fake.then(Behaviour(tokens=[" z"] * 500, delay=0.02))
    async with (
        httpx.AsyncClient(timeout=UNIT) as client,
        client.stream("GET", f"{server.http}{path}", params={"prompt": "go"}) as response,
    ):
        async for text in response.aiter_text():
            if "z" in text:
                break
    await wait_hung_up(fake, 0, within=1.0)
    assert not fake.requests[0].completed


async def test_stream_failure_after_headers_ends_with_error_line(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["Some", " text", " more"], drop_after=2))
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/stream", params={"prompt": "x"})
    assert response.status_code == 200
    body, _, last = response.text.rstrip("\n").rpartition("\n")
    assert body == "Some text"
    assert last.startswith("[error] The connection to the model server")


def parse_events(raw: str) -> list[dict[str, object]]:
    events = []
    for block in raw.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            events.append(json.loads(block.removeprefix("data: ")))
    return events


async def test_sse_sends_frames_start_to_end(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(tokens=["a", "b", "c"]))
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/sse", params={"prompt": "abc"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    assert events[0] == {"sender": "bot", "message": "", "type": "start"}
    assert [e["message"] for e in events if e["type"] == "stream"] == ["a", "b", "c"]
    # The fake reports a prompt token per word sent (system prompt and question), and a
    # completion token per token.
    timings = events[-1].pop("timings")
    assert isinstance(timings, dict)
    assert set(timings) == {"first_token_seconds", "duration_seconds"}
    assert events[-1] == {
        "sender": "bot",
        "message": "",
        "type": "end",
        "status": "completed",
        "usage": {"prompt_tokens": 18, "completion_tokens": 3, "estimated": False},
    }


async def test_sse_failure_sends_error_then_end(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(status=401))
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/sse", params={"prompt": "x"})
    events = parse_events(response.text)
    assert [e["type"] for e in events][-2:] == ["error", "end"]
    assert events[-2]["code"] == "upstream_auth"
    assert events[-1]["status"] == "error"


async def test_healthz_names_mode_model_and_upstream(
    server: Addressed, fake: FakeUpstream, make_settings: SettingsFactory
) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/healthz")
        assert response.status_code == 200
        report = response.json()
        assert report == {
            "status": "ok",
            "mode": "remote",
            "model": "fake-model",
            "upstream": fake.url,
            "auth": "none",
        }
        with live_server(
            make_settings(openai_base_url=None, local_model_path="/nonexistent.gguf")
        ) as bare:
            unhealthy = await client.get(f"{bare.http}/healthz")
            missing = unhealthy.json()
    assert unhealthy.status_code == 503
    assert missing["status"] == "unconfigured"
    assert missing["mode"] == "local"
    assert "OPENAI_API_KEY" in missing["detail"]
    await asyncio.sleep(0)
