"""A question over the socket: frame order, text, history across turns."""

from __future__ import annotations

import json

import httpx

from backend.config.settings import LOCAL_TEMPERATURE
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    UNIT,
    IsolatedSettings,
    SettingsFactory,
    ask,
    connect,
    conversation_of,
    kinds,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
)


async def test_question_frames_in_order(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        frames = await ask(ws, "hello there")
    assert frames[0] == {"sender": "you", "message": "hello there", "type": "stream", "seq": 1}
    assert frames[1] == {"sender": "bot", "message": "", "type": "start", "seq": 2}
    assert kinds(frames) == ["you:stream", "start", "info", "stream", "end"]
    text = text_of(frames)
    assert text == "You said: hello there"
    # Reply text advances `seq` by its length, so a `seq` says where in the text it ends.
    assert frames[-2]["seq"] == 3 + len(text)
    timings = frames[-1].pop("timings")
    assert 0 < timings["first_token_seconds"] <= timings["duration_seconds"] < 2
    assert frames[-1] == {
        "sender": "bot",
        "message": "",
        "type": "end",
        "status": "completed",
        "seq": 4 + len(text),
        # As the fake counts: a prompt token per word of the system prompt and the question.
        "usage": {"prompt_tokens": 19, "completion_tokens": 4, "estimated": False},
    }


async def test_plain_text_frame_is_a_question(server: Addressed, fake: FakeUpstream) -> None:
    async with connect(server.ws) as ws:
        await ws.send("what is 2+2?")
        frames = await until_end(ws)
    assert frames[0]["message"] == "what is 2+2?"
    assert text_of(frames) == "You said: what is 2+2?"


async def test_history_carries_across_turns(server: Addressed, fake: FakeUpstream) -> None:
    fake.then(Behaviour(tokens=["Paris", "."]), Behaviour(tokens=["Yes"]))
    async with connect(server.ws) as ws:
        await ask(ws, "capital of France?")
        await ask(ws, "are you sure?")
    second = fake.requests[1].messages
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[1]["content"] == "capital of France?"
    assert second[2]["content"] == "Paris."
    assert second[3]["content"] == "are you sure?"


async def test_upstream_connection_is_reused_across_turns(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    # A server of its own, whose connection pool starts empty.
    with live_server(make_settings()) as server:
        async with connect(server.ws) as ws:
            for n in range(5):
                assert (await ask(ws, f"turn {n}"))[-1]["status"] == "completed"
    assert len(fake.requests) == 5
    assert fake.connections == 1


async def test_reply_limit_reaches_the_model_server(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    with live_server(make_settings(chat_max_reply_tokens=50)) as server:
        async with connect(server.ws) as ws:
            await ask(ws, "short please")
    # OpenAI-compatible servers such as llama.cpp's read `max_tokens`, not only the newer name.
    body = fake.requests[0].body
    assert body["max_tokens"] == 50
    assert body["max_completion_tokens"] == 50


async def test_system_prompt_and_question_are_sent_verbatim(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    prompt = 'Reply as JSON like {"answer": "..."}; never use {placeholders}.'
    with live_server(make_settings(chat_system_prompt=prompt)) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "What is {x} in {lang}?")
    assert frames[-1]["status"] == "completed"
    assert fake.requests[0].messages == [
        {"role": "system", "content": prompt},
        {"role": "user", "content": "What is {x} in {lang}?"},
    ]


async def test_temperature_reaches_the_model_server(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    for overrides, expected in [({}, 0.7), ({"chat_temperature": 0.0}, 0.0)]:
        fake.reset()
        with live_server(make_settings(**overrides)) as server:
            async with connect(server.ws) as ws:
                await ask(ws, "how warm?")
        assert fake.requests[0].body["temperature"] == expected


def test_embedded_model_samples_cooler_unless_told() -> None:
    local = IsolatedSettings(local_model_path="/models/any.gguf")
    assert local.mode == "local"
    assert local.temperature == LOCAL_TEMPERATURE == 0.2
    assert IsolatedSettings(local_model_path="/m.gguf", chat_temperature=0.9).temperature == 0.9
    assert IsolatedSettings(openai_base_url="http://127.0.0.1:1/v1").temperature == 0.7


async def test_an_edited_question_replaces_the_last_turn(
    server: Addressed, fake: FakeUpstream
) -> None:
    """`regenerate` with a `message`: the last question and its reply are replaced, in the
    frames, in the store, in what a resuming client is sent, and in the model's history."""
    async with connect(server.ws) as ws:
        await ask(ws, "the first question")
        fake.then(Behaviour(tokens=[" x"] * 300, delay=0.01))
        await ws.send("a question with a typo")
        typo = await recv(ws)
        await until_reply_text(ws)
        await ws.send(json.dumps({"type": "regenerate", "message": "a typo-free question"}))
        interrupted = await until_end(ws)  # the reply in flight ends first
        edited = await until_end(ws)
        conversation = conversation_of(ws)
    assert interrupted[-1]["status"] == "interrupted"
    echo = next(f for f in edited if f["sender"] == "you")
    assert echo["message"] == "a typo-free question"
    assert echo["replaces"] == typo["seq"]
    start = next(f for f in edited if f["type"] == "start" and f["seq"] > echo["seq"])
    assert start["regenerate"] is True
    assert edited[-1]["status"] == "completed"
    sent = [(m["role"], m["content"]) for m in fake.requests[-1].messages[1:]]
    assert sent == [
        ("user", "the first question"),
        ("assistant", "You said: the first question"),
        ("user", "a typo-free question"),
    ]
    async with connect(f"{server.ws}?conversation={conversation}") as again:
        replayed = await until_end(again)
        replayed += await until_end(again)
    questions = [f["message"] for f in replayed if f["sender"] == "you"]
    assert questions == ["the first question", "a typo-free question"]
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        stored = (await client.get(f"/api/conversations/{conversation}")).json()
    assert [m["text"] for m in stored["messages"]] == [
        "the first question",
        "You said: the first question",
        "a typo-free question",
        "You said: a typo-free question",
    ]
