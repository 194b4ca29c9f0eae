"""The shortcuts in backend/speedups: each still fits the library it reaches into, each can be
left out, and the server answers, streams and stops the same without them."""

from __future__ import annotations

import json

import httpcore2
import openai
import pytest

from backend.chain import build_model
from backend.speedups import PROBES, usable
from backend.speedups.fast_stream import DictChunkCompletions
from backend.speedups.model_transport import AsyncioBackend, model_transport
from backend.upstream import remote_upstream
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    ask,
    connect,
    live_server,
    text_of,
    until_end,
    until_reply_text,
    wait_hung_up,
)


@pytest.mark.parametrize("name", sorted(PROBES))
def test_the_private_api_each_shortcut_relies_on_is_still_there(name: str) -> None:
    # When this fails, a library changed under a shortcut: the server still works (it leaves
    # the shortcut out), but it is slower until the shortcut is brought up to date.
    assert PROBES[name]() is None


@pytest.mark.parametrize("wanted", [True, False])
def test_the_shortcuts_are_in_use_unless_left_out(
    upstream_server: FakeUpstream, wanted: bool
) -> None:
    settings = fake_settings(upstream_server, chat_speedups=wanted)
    client = openai.DefaultAsyncHttpxClient()
    model = build_model(settings, remote_upstream(settings), client)
    assert isinstance(model.async_client, DictChunkCompletions) is wanted
    pool = model_transport(openai.DEFAULT_CONNECTION_LIMITS)._pool
    assert isinstance(pool, httpcore2.AsyncConnectionPool)
    assert isinstance(pool._network_backend, AsyncioBackend)


def test_a_shortcut_whose_library_changed_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(openai.AsyncStream, "_iter_events")
    assert not usable("fast_stream")
    assert "not using the fast_stream speedup" in caplog.text
    assert not usable("model_transport", wanted=False)


async def test_without_the_shortcuts_replies_stream_and_stop_the_same(
    upstream_server: FakeUpstream,
) -> None:
    fake = upstream_server
    fake.reset()
    settings = fake_settings(fake, chat_speedups=False)
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "plain")
            assert text_of(frames).endswith("plain")
            fake.then(Behaviour(tokens=["slow "] * 400, delay=0.02))
            await ws.send(json.dumps({"type": "question", "message": "long"}))
            await until_reply_text(ws)
            await ws.send(json.dumps({"type": "stop"}))
            assert (await until_end(ws))[-1]["status"] == "interrupted"
        assert await wait_hung_up(fake, 1) < 1.0
    fake.reset()
