"""Your own chain, served: by import string, invoked with the conversation as messages, its
silent steps silent, its failures said with a code and a sentence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend.model.assistants import ChainImportError
from backend.web.app import create_app
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import ask, connect, live_server, text_of


async def test_a_chain_without_a_model_answers_with_what_it_returns(
    upstream_server: FakeUpstream,
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:shouting")
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            first = await ask(ws, "hello")
            second = await ask(ws, "again")
    assert text_of(first) == "HELLO (1 messages)"
    # The conversation so far, then the question: two turns before it.
    assert text_of(second) == "AGAIN (3 messages)"
    assert second[-1]["status"] == "completed"


async def test_only_the_tokens_of_runs_not_tagged_nostream_are_the_reply(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:condensed")
    fake.then(
        Behaviour(tokens=["What", " is", " up?"]),  # the silent rewrite
        Behaviour(tokens=["All", " fine."]),
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "sup")
    assert text_of(frames) == "All fine."
    assert [m["content"] for m in fake.requests[-1].messages] == ["What is up?"]
    usage = frames[-1]["usage"]
    # Both model calls are counted: 2 + 3 prompt words, 3 + 2 tokens.
    assert usage == {"prompt_tokens": 5, "completion_tokens": 5, "estimated": False}


async def test_a_chain_that_raises_ends_with_chain_error_and_the_next_question_works(
    upstream_server: FakeUpstream,
) -> None:
    settings = fake_settings(
        upstream_server,
        chat_chain="broken",
        chat_chains=["broken=tests.chains:broken", "shout=tests.chains:shouting"],
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "where is it?")
            errors = [f for f in frames if f["type"] == "error"]
            assert [e["code"] for e in errors] == ["chain_error"]
            assert errors[0]["message"] == (
                "The assistant's chain failed: IndexMissing: no index was built for these documents"
            )
            assert frames[-1]["status"] == "error"
            again = await ask(ws, "still there?")
    assert again[-1]["type"] == "end"


async def test_a_tool_that_raises_ends_with_tool_error(upstream_server: FakeUpstream) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:calculating")
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "1/0?")
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["code"] for e in errors] == ["tool_error"]
    assert (
        errors[0]["message"]
        == "The tool 'divide' failed: ZeroDivisionError: float division by zero"
    )


@pytest.mark.parametrize(
    ("chain", "reason"),
    [
        ("tests.chains", "expected package.module:attribute, or the name of an assistant (chat)"),
        ("tests.chains:", "expected package.module:attribute"),
        ("tests.no_such_module:chain", "the module cannot be imported"),
        ("tests.chains:missing", "tests.chains has no attribute 'missing'"),
        ("tests.chains:not_a_chain", "it is a int, not a LangChain Runnable"),
        ("tests.chains:failing_factory", "its factory failed: RuntimeError: the vector store"),
    ],
)
def test_a_chain_that_cannot_be_served_stops_the_app_with_the_reason(
    upstream_server: FakeUpstream, chain: str, reason: str
) -> None:
    with pytest.raises(ChainImportError) as refused:
        create_app(fake_settings(upstream_server, chat_chain=chain))
    assert f"cannot serve the chain {chain!r}: {reason}" in str(refused.value)


def test_the_server_refuses_to_start_on_a_chain_it_cannot_import() -> None:
    started = subprocess.run(
        [sys.executable, "-m", "backend", "--port", "0"],
        env={"CHAT_CHAIN": "tests.chains:missing", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert "cannot serve the chain 'tests.chains:missing'" in started.stderr
    assert "Traceback" not in started.stderr
