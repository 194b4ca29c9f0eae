"""The embedded model: real SmolLM2 through `llama_cpp.server`, and the child process's life."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from websockets.asyncio.client import ClientConnection

from backend.model.embedded import bundled_model_path, gguf_token_counter
from backend.process.server import free_port
from tests.harness import (
    UNIT,
    Frame,
    IsolatedSettings,
    LiveServer,
    alive,
    ask,
    backend_process,
    connect,
    live_server,
    recv,
    signal_leaves_no_orphan,
    text_of,
    until_end,
    wait_gone,
)

pytestmark = pytest.mark.model

MODEL_WAIT = UNIT * 30


def is_token(frame: Frame) -> bool:
    return bool(frame["type"] == "stream" and frame["sender"] == "bot")


def local_settings(**overrides: Any) -> IsolatedSettings:
    values: dict[str, Any] = {"chat_temperature": 0.0, "chat_max_reply_tokens": 200}
    values.update(overrides)
    return IsolatedSettings(**values)


async def wait_healthy(base: str, pid_not: int | None = None) -> dict[str, object]:
    """Poll /healthz until the embedded model is ready (with a new pid, if `pid_not`)."""
    report: dict[str, object] = {}
    async with httpx.AsyncClient(timeout=UNIT) as client:
        try:
            async with asyncio.timeout(MODEL_WAIT):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        report = (await client.get(f"{base}/healthz")).json()
                    local = report.get("local")
                    ready = report.get("status") == "ok"
                    if ready and isinstance(local, dict) and local["pid"] != pid_not:
                        return report
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"the embedded model never became ready: {report}") from None


def child_pid(report: dict[str, object]) -> int:
    local = report["local"]
    assert isinstance(local, dict)
    pid = local["pid"]
    assert isinstance(pid, int)
    return pid


@pytest.fixture(scope="module")
def model_server() -> Iterator[LiveServer]:
    with live_server(local_settings()) as server:
        asyncio.run(wait_healthy(server.http))
        yield server


async def test_question_streams_real_tokens(model_server: LiveServer) -> None:
    async with connect(model_server.ws) as ws:
        frames = await ask(ws, "Name three colours.")
    tokens = [f for f in frames if is_token(f)]
    assert len(tokens) >= 5
    assert frames[-1]["status"] == "completed"
    assert text_of(frames).strip()


async def test_reply_stops_at_the_token_limit(model_server: LiveServer) -> None:
    async with connect(model_server.ws) as ws:
        frames = await until_end_of(ws, "Write a very long story about a lighthouse keeper.")
    assert frames[-1]["status"] == "completed"
    path = bundled_model_path()
    assert path is not None
    tokens = gguf_token_counter(str(path))([AIMessage(text_of(frames))]) - 6
    assert 100 < tokens <= 205  # the module server allows 200 reply tokens


async def test_stop_really_stops_the_model(model_server: LiveServer) -> None:
    async with connect(model_server.ws) as ws:
        await ws.send("Write a very long story about a lighthouse keeper.")
        seen: list[Frame] = []
        while len([f for f in seen if is_token(f)]) < 5:
            seen.append(await recv(ws, within=MODEL_WAIT))
        await ws.send(json.dumps({"type": "stop"}))
        ended = await until_end(ws)
        assert ended[-1]["status"] == "interrupted"
        # The model is free at once: the next reply's first token comes quickly.
        asked = time.monotonic()
        await ws.send("Say hello.")
        while True:
            frame = await recv(ws, within=MODEL_WAIT)
            if is_token(frame):
                break
        assert time.monotonic() - asked < 3.0
        assert (await until_end(ws, within=MODEL_WAIT))[-1]["status"] == "completed"


async def test_two_conversations_at_once_both_complete(model_server: LiveServer) -> None:
    async def converse(question: str) -> list[Frame]:
        async with connect(model_server.ws) as ws:
            return await until_end_of(ws, question)

    first = asyncio.create_task(converse("Write a long story about a dragon."))
    await asyncio.sleep(0.5)  # the first reply is streaming when the second question comes
    second = await converse("Write a long poem about the sea.")
    for frames in (await first, second):
        assert not [f for f in frames if f["type"] == "error"], frames
        assert frames[-1]["status"] == "completed"
        assert len(text_of(frames)) > 100


async def test_three_turns_in_a_row(model_server: LiveServer) -> None:
    async with connect(model_server.ws) as ws:
        for question in ["What is 2 plus 2?", "And 3 plus 3?", "Thank you."]:
            frames = await until_end_of(ws, question)
            assert frames[-1]["status"] == "completed"
            assert text_of(frames).strip()
            info = [f["message"] for f in frames if f["type"] == "info"]
            assert info, frames


async def until_end_of(ws: ClientConnection, question: str) -> list[Frame]:
    """Ask, and read the reply to its `end`, at the model's pace."""
    await ws.send(question)
    return await until_end(ws, within=MODEL_WAIT)


@pytest.mark.timeout(400)  # ten full-context prompts on a 2-core CPU: about a minute here
async def test_conversation_longer_than_the_context_still_answers() -> None:
    # Ten turns of about 300 tokens: half again as much as the 2,048-token context holds.
    padding = " ".join(f"item{i}" for i in range(100))
    settings = local_settings(chat_max_reply_tokens=16)
    with live_server(settings) as server:
        await wait_healthy(server.http)
        async with connect(server.ws) as ws:
            for turn in range(10):
                frames = await until_end_of(ws, f"Turn {turn}. Remember these: {padding}")
                errors = [f for f in frames if f["type"] == "error"]
                assert not errors, f"turn {turn}: {errors}"
                assert frames[-1]["status"] == "completed"


async def test_our_environment_does_not_reconfigure_the_model_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with live_server(local_settings()) as server:
        # What `make run PORT=...` or an unrelated secret leaves in the environment: the child
        # must not bind our port nor start asking for a key.
        monkeypatch.setenv("PORT", str(server.port))
        monkeypatch.setenv("API_KEY", "unrelated-secret")
        monkeypatch.setenv("N_CTX", "64")
        first = child_pid(await wait_healthy(server.http))
        os.kill(first, signal.SIGKILL)
        await wait_healthy(server.http, pid_not=first)
        async with connect(server.ws) as ws:
            frames = await until_end_of(ws, "Name a colour.")
    assert frames[-1]["status"] == "completed"


async def test_question_during_start_up_waits_for_the_model() -> None:
    with live_server(local_settings()) as server:
        async with httpx.AsyncClient(timeout=UNIT) as client:
            starting = await client.get(f"{server.http}/healthz")
        assert starting.status_code == 503
        assert starting.json()["status"] == "starting"
        async with connect(server.ws) as ws:
            frames = await until_end_of(ws, "Hello!")
    notes = [f["message"] for f in frames if f["type"] == "info"]
    assert any("Waiting for the embedded model to start" in note for note in notes), notes
    assert frames[-1]["status"] == "completed"


def test_chat_template_makes_user_and_assistant_turns() -> None:
    path = bundled_model_path()
    assert path is not None
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    formatter = Jinja2ChatFormatter(
        template=vocab.metadata["tokenizer.chat_template"], eos_token="", bos_token=""
    )
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("first question"),
        AIMessage("first answer"),
        HumanMessage("second question"),
    ]
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    rendered: Any = [{"role": roles[m.type], "content": str(m.content)} for m in messages]
    prompt = formatter(messages=rendered).prompt
    order = [
        "<|im_start|>system\nBe brief.<|im_end|>",
        "<|im_start|>user\nfirst question<|im_end|>",
        "<|im_start|>assistant\nfirst answer<|im_end|>",
        "<|im_start|>user\nsecond question<|im_end|>",
    ]
    positions = [prompt.index(part) for part in order]
    assert positions == sorted(positions)
    assert prompt.rstrip().endswith("<|im_start|>assistant")


async def test_child_is_restarted_after_it_dies() -> None:
    with live_server(local_settings()) as server:
        first = child_pid(await wait_healthy(server.http))
        async with connect(server.ws) as ws:
            await ws.send("Write a very long story about a river.")
            while not is_token(await recv(ws, within=MODEL_WAIT)):
                pass
            os.kill(first, signal.SIGKILL)
            frames = await until_end(ws, within=MODEL_WAIT)
            error = next(f for f in frames if f["type"] == "error")
            assert error["code"] == "upstream_unavailable"
            assert "stopped" in error["message"]
            assert "restarted" in error["message"]
            assert frames[-1]["status"] == "error"
            report = await wait_healthy(server.http, pid_not=first)
            local = report["local"]
            assert isinstance(local, dict)
            assert local["restarts"] == 1
            assert not alive(first)
            again = await until_end_of(ws, "Say hello.")
            assert again[-1]["status"] == "completed"
        second = child_pid(report)
    await wait_gone(second)


async def test_no_orphan_when_the_server_stops() -> None:
    # The stand-in child's tests cover SIGKILL and SIGINT; this is uvicorn's shutdown path.
    port = free_port()
    async with backend_process(port) as parent:
        pid = child_pid(await wait_healthy(f"http://127.0.0.1:{port}"))
        await signal_leaves_no_orphan(parent, signal.SIGTERM, pid)
