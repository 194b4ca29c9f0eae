"""Bad input gets one clear `error` frame; the socket, the reply in progress and history survive."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosed

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    SettingsFactory,
    ask,
    connect,
    live_server,
    recv,
    text_of,
    until_end,
)

BAD_FRAMES: list[tuple[str | bytes, str]] = [
    (
        json.dumps({"type": "dance"}),
        "Unknown message type 'dance'; expected one of: question, stop",
    ),
    (json.dumps({"message": "hi"}), "no 'type'"),
    (json.dumps({"type": "question"}), "needs a 'message' string"),
    (json.dumps({"type": "question", "message": 42}), "needs a 'message' string"),
    (json.dumps({"type": "question", "message": ""}), "The question is empty"),
    (json.dumps({"type": "question", "message": " \n\t "}), "The question is empty"),
    ("", "The frame is empty"),
    ("   ", "The question is empty"),
    (b"\x00\x01binary", "Binary frames are not supported"),
    ("x" * 16_001, "16,001 characters long; the limit is 16,000"),
    (json.dumps({"type": "question", "message": "y" * 20_000}), "the limit is 16,000"),
    ('{"type": "question", "message": ' + "[" * 5_000 + "]" * 5_000 + "}", "nests too deeply"),
    ('{"type": "stop", "x": ' + "[" * 30_000 + "]" * 30_000 + "}", "nests too deeply"),
    ('{"type": "stop", "after": ' + "9" * 5_000 + "}", "a number too long"),
    ('{"type": "question", "message": "hi \\ud800"}', "(U+D800 at position 4)"),
    ('{"type": "question", "message": "nul \\u0000 byte"}', "(U+0000 at position 5)"),
    ("plain \x00 text", "(U+0000 at position 7)"),
]


@pytest.mark.parametrize(("frame", "expected"), BAD_FRAMES)
async def test_bad_frame_gets_error_and_socket_stays(
    server: Addressed, fake: FakeUpstream, frame: str | bytes, expected: str
) -> None:
    async with connect(server.ws) as ws:
        await ask(ws, "before")
        await ws.send(frame)
        error = await recv(ws)
        assert error["type"] == "error"
        assert error["sender"] == "bot"
        assert error["code"] == "bad_request"
        assert expected in error["message"]
        with pytest.raises(TimeoutError):
            await recv(ws, within=0.2)
        frames = await ask(ws, "after")
        assert frames[-1]["status"] == "completed"
    # The bad frame never reached the model and did not touch the conversation.
    assert len(fake.requests) == 2
    assert [m["content"] for m in fake.requests[1].messages[1:]] == [
        "before",
        "You said: before",
        "after",
    ]


async def test_bad_frame_during_reply_leaves_reply_alone(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[f" {i}" for i in range(30)], delay=0.01))
    async with connect(server.ws) as ws:
        await ws.send("count to thirty")
        await ws.send(json.dumps({"type": "nonsense"}))
        frames = await until_end(ws)
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1
    assert frames[-1]["status"] == "completed"
    assert text_of(frames) == "".join(f" {i}" for i in range(30))


async def test_frame_over_byte_limit_is_an_error(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(chat_max_frame_bytes=2048, chat_max_question_chars=100_000)
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            await ws.send("é" * 1500)  # 3,000 bytes in UTF-8, 1,500 characters
            error = await recv(ws)
            assert error["type"] == "error"
            assert "3,000 bytes; the limit is 2,048 bytes" in error["message"]
            frames = await ask(ws, "still here?")
            assert frames[-1]["status"] == "completed"


async def test_frame_far_over_limit_closes_with_1009(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(chat_max_frame_bytes=2048)
    with live_server(settings) as server:
        async with connect(server.ws, max_size=None) as ws:
            await ws.send("z" * (settings.ws_max_size + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
