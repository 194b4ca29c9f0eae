"""The shortcuts in backend/speedups: each still fits the library it reaches into, each can be
left out, and the server answers, streams and stops the same without them."""

from __future__ import annotations

import json

import httpcore2
import openai
import pytest
from limits import parse
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from backend.config.timings import RATES_SWEEP_EVERY
from backend.model.chain import build_model
from backend.model.upstream import remote_upstream
from backend.observe.metrics import Metrics
from backend.speedups import PROBES, usable
from backend.speedups.fast_stream import DictChunkCompletions
from backend.speedups.memory_rates import MemoryRates
from backend.speedups.model_transport import AsyncioBackend, model_transport
from backend.users.quotas import Quotas
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
    quotas = Quotas(settings, None, Metrics())
    assert isinstance(quotas.moving.storage, MemoryRates) is wanted
    assert isinstance(quotas.fixed.storage, MemoryRates) is wanted


def test_a_shortcut_whose_library_changed_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(openai.AsyncStream, "_iter_events")
    assert not usable("fast_stream")
    assert "not using the fast_stream speedup" in caplog.text
    assert not usable("model_transport", wanted=False)


def test_rates_are_counted_in_limits_own_memory_storage_if_its_sweep_moved(
    upstream_server: FakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(MemoryStorage, "_MemoryStorage__schedule_expiry")
    quotas = Quotas(fake_settings(upstream_server), None, Metrics())
    assert type(quotas.moving.storage) is MemoryStorage
    assert "not using the memory_rates speedup" in caplog.text


@pytest.mark.parametrize("storage", [MemoryStorage, MemoryRates])
async def test_the_memory_storage_sweeps_through_the_method_memory_rates_replaces(
    monkeypatch: pytest.MonkeyPatch, storage: type[MemoryStorage]
) -> None:
    # `MemoryRates` overrides a private method by its mangled name; if `limits` stopped calling
    # it after every hit, the override would silently do nothing. Both counted here: the plain
    # storage sweeps after every hit, `MemoryRates` once per `RATES_SWEEP_EVERY`.
    sweeps = 0

    async def sweep(self: MemoryStorage) -> None:
        nonlocal sweeps
        sweeps += 1

    monkeypatch.setattr(MemoryStorage, "_MemoryStorage__schedule_expiry", sweep)
    rates = storage()
    moving, fixed = MovingWindowRateLimiter(rates), FixedWindowRateLimiter(rates)
    item = parse("100/minute")

    async def hit_both(times: int) -> None:
        for _ in range(times):
            assert await moving.hit(item, "questions", "someone")
            assert await fixed.hit(item, "tokens", "someone")

    await hit_both(5)
    if storage is MemoryStorage:
        assert sweeps >= 10
        return
    assert isinstance(rates, MemoryRates)
    assert sweeps == 1
    rates._swept -= RATES_SWEEP_EVERY  # as if that long had passed
    await hit_both(5)
    assert sweeps == 2


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
