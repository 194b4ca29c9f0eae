"""Upstream failures: an actionable error, `end` with status `error`, and the next turn works."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from backend.process.server import free_port
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    UNIT,
    SettingsFactory,
    ask,
    bare,
    connect,
    conversation_of,
    kinds,
    live_server,
    text_of,
)


def error_of(frames: list[dict[str, object]]) -> dict[str, object]:
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1, frames
    return errors[0]


@pytest.mark.parametrize(
    ("status", "code", "words", "requests"),
    [
        (401, "upstream_auth", ["rejected the API key (401)", "OPENAI_API_KEY"], 1),
        (429, "upstream_rate_limited", ["rate limiting", "(429)", "Wait a moment"], 2),
        (500, "upstream_unavailable", ["HTTP 500", "Try again"], 2),
        (503, "upstream_unavailable", ["HTTP 503"], 2),
        (400, "upstream_rejected", ["HTTP 400", "fake failure"], 1),
    ],
)
async def test_status_failure_is_reported_then_next_question_works(
    server: Addressed,
    fake: FakeUpstream,
    status: int,
    code: str,
    words: list[str],
    requests: int,
) -> None:
    failing = Behaviour(status=status)
    fake.then(*[failing] * requests)
    async with connect(server.ws) as ws:
        frames = await ask(ws, "hello")
        error = error_of(frames)
        assert error["code"] == code
        for word in words:
            assert word in str(error["message"])
        assert bare(frames[-1]) == {
            "sender": "bot",
            "message": "",
            "type": "end",
            "status": "error",
        }
        assert kinds(frames)[:2] == ["you:stream", "start"]
        again = await ask(ws, "again")
    assert again[-1]["status"] == "completed"
    # Retryable failures are retried exactly once; the rest not at all.
    assert len(fake.requests) == requests + 1
    # A turn that failed before its first token leaves the history as it was.
    assert [m["role"] for m in fake.requests[-1].messages] == ["system", "user"]


async def test_one_quick_retry_recovers_a_5xx(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(status=502))
    async with connect(server.ws) as ws:
        frames = await ask(ws, "are you there")
    assert frames[-1]["status"] == "completed"
    assert text_of(frames) == "You said: are you there"
    retry_notes = [f for f in frames if f["type"] == "info" and "Retrying once" in f["message"]]
    assert len(retry_notes) == 1
    assert len(fake.requests) == 2


async def test_connection_refused_names_the_url(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with live_server(make_settings(openai_base_url=url)) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "anyone?")
            healthy = await ask(ws, "still?")
    error = error_of(frames)
    assert error["code"] == "upstream_unreachable"
    assert f"Cannot reach the model server at {url}" in str(error["message"])
    assert frames[-1]["status"] == "error"
    assert healthy[-1]["status"] == "error"


async def test_timeout_is_reported_and_request_abandoned(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(hang=True))
    with live_server(make_settings(chat_timeout=0.5)) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "hang please")
            after = await ask(ws, "and now?")
    error = error_of(frames)
    assert error["code"] == "upstream_timeout"
    assert "CHAT_TIMEOUT" in str(error["message"])
    assert frames[-1]["status"] == "error"
    assert after[-1]["status"] == "completed"
    assert fake.requests[0].hung_up
    # A timeout is not retried: it already waited the whole time.
    assert len(fake.requests) == 2


async def test_stall_mid_reply_times_out_and_keeps_partial(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["Part", "ial", " never"], stall_after=2))
    with live_server(make_settings(chat_timeout=0.5)) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "first")
            await ask(ws, "second")
    error = error_of(frames)
    assert error["code"] == "upstream_timeout"
    assert frames[-1]["status"] == "error"
    assert text_of(frames) == "Partial"
    assert fake.requests[0].hung_up
    assert [m["content"] for m in fake.requests[1].messages[1:]] == ["first", "Partial", "second"]


async def test_dropped_stream_keeps_partial_text(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(tokens=["Half", " an", " answer", " lost"], drop_after=3))
    async with connect(server.ws) as ws:
        frames = await ask(ws, "tell me")
        error = error_of(frames)
        assert error["code"] == "upstream_dropped"
        assert "broke off" in str(error["message"])
        assert frames[-1]["status"] == "error"
        assert text_of(frames) == "Half an answer"
        await ask(ws, "go on")
    # Not retried (tokens had arrived), and the partial text is in the history.
    assert len(fake.requests) == 2
    assert [m["content"] for m in fake.requests[1].messages[1:]] == [
        "tell me",
        "Half an answer",
        "go on",
    ]


async def test_unconfigured_server_says_what_to_set(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(
        openai_base_url=None, openai_api_key=None, local_model_path="/nonexistent/model.gguf"
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "hello?")
    error = error_of(frames)
    assert error["code"] == "not_configured"
    assert "OPENAI_API_KEY" in str(error["message"])
    assert "OPENAI_BASE_URL" in str(error["message"])
    assert "LOCAL_MODEL_PATH is /nonexistent/model.gguf" in str(error["message"])
    assert frames[-1]["status"] == "error"


async def test_stream_with_no_text_is_reported(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(empty=True))
    async with connect(server.ws) as ws:
        frames = await ask(ws, "anything?")
    error = error_of(frames)
    assert error["code"] == "upstream_rejected"
    assert "without sending any text" in str(error["message"])
    assert frames[-1]["status"] == "error"


async def test_error_event_mid_stream_is_reported_and_partial_kept(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(
        Behaviour(tokens=["Half", " way", " more"], error_after=2, error_message="overloaded")
    )
    async with connect(server.ws) as ws:
        frames = await ask(ws, "start")
        await ask(ws, "again")
    error = error_of(frames)
    assert error["code"] == "upstream_rejected"
    assert "overloaded" in str(error["message"])
    assert text_of(frames) == "Half way"
    assert [m["content"] for m in fake.requests[1].messages[1:]] == ["start", "Half way", "again"]


async def test_characters_no_text_can_carry_from_the_model_are_replaced(
    server: Addressed, fake: FakeUpstream
) -> None:
    # A lone surrogate (JSON's "\ud800") and NUL have no place in a frame or a database row.
    fake.then(Behaviour(tokens=["odd ", "\ud800", " and ", "\x00", " end"]))
    async with connect(server.ws) as ws:
        frames = await ask(ws, "say something odd")
        conversation = conversation_of(ws)
        assert text_of(frames) == "odd \ufffd and \ufffd end"
        assert frames[-1]["status"] == "completed"
        # The conversation, and the next ones, are still stored.
        assert text_of(await ask(ws, "and again")).endswith("and again")
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        async with asyncio.timeout(UNIT * 3):
            while True:
                stored = (await client.get(f"/api/conversations/{conversation}")).json()
                if len(stored["messages"]) == 4 and stored["messages"][3]["status"] != "streaming":
                    break
                await asyncio.sleep(0.1)
    assert stored["messages"][1]["text"] == "odd \ufffd and \ufffd end"
