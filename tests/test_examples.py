"""The examples in `examples/`, served as the README says, against the fake model (and the
docs example against the embedded model)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from deploy.services import environment_without_settings
from fakes.openai_server import Behaviour, FakeUpstream
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    Frame,
    ask,
    connect,
    live_server,
    python_process,
    text_of,
    until_end,
)
from tests.test_local_model import MODEL_WAIT, local_settings, wait_healthy


def steps_of(frames: list[Frame], kind: str) -> list[Frame]:
    return [f for f in frames if f.get("step", {}).get("kind") == kind]


async def test_the_agent_calculates_with_its_tool(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    fake.then(
        Behaviour(tool_calls=[("calculator", {"expression": "(2 + 3) * 4"})]),
        Behaviour(tokens=["It", " is", " 20."]),
    )
    with live_server(fake_settings(upstream_server, chat_chain="examples.agent:agent")) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "What is (2+3)*4?")
    tools = steps_of(frames, "tool")
    assert [f["step"]["status"] for f in tools] == ["started", "completed"]
    assert tools[1]["step"]["detail"]["result"] == "20"
    assert text_of(frames) == "It is 20."
    system = fake.requests[-1].messages[0]
    assert system["role"] == "system"
    assert "Use the tools" in system["content"]


async def test_the_agent_refuses_what_is_not_arithmetic(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    fake.then(
        Behaviour(tool_calls=[("calculator", {"expression": "__import__('os')"})]),
        Behaviour(tokens=["I cannot."]),
    )
    with live_server(fake_settings(upstream_server, chat_chain="examples.agent:agent")) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "import os")
    # The agent's tool node hands the error back to the model, which answers.
    assert text_of(frames) == "I cannot."
    result = fake.requests[-1].messages[-1]
    assert result["role"] == "tool"
    assert "only numbers and + - * / ** % are allowed" in result["content"]


async def test_the_agent_searches_the_users_earlier_conversations(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    with live_server(fake_settings(upstream_server, chat_chain="examples.agent:agent")) as server:
        async with connect(server.ws) as ws:
            fake.then(Behaviour(tokens=["Lighthouses", " guide", " ships."]))
            await ask(ws, "What do lighthouses do?")
        fake.then(
            Behaviour(tool_calls=[("search_my_conversations", {"text": "LIGHTHOUSE"})]),
            Behaviour(tokens=["You", " asked", " about", " lighthouses."]),
        )
        async with connect(server.ws) as ws:
            frames = await ask(ws, "What did I ask about lighthouses?")
    assert text_of(frames) == "You asked about lighthouses."
    found = fake.requests[-1].messages[-1]
    assert found["role"] == "tool"
    assert (
        "asked 'What do lighthouses do?', answered 'Lighthouses guide ships.'" in found["content"]
    )
    assert "What did I ask" not in found["content"]  # the turn being answered is not earlier


async def test_the_agent_searches_from_a_one_off_stream_too(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    with live_server(fake_settings(upstream_server, chat_chain="examples.agent:agent")) as server:
        async with connect(server.ws) as ws:
            fake.then(Behaviour(tokens=["Owls", " hoot."]))
            await ask(ws, "What do owls do?")
        fake.then(
            Behaviour(tool_calls=[("search_my_conversations", {"text": "owls"})]),
            Behaviour(tokens=["About", " owls."]),
        )
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            answer = await client.get("/stream", params={"prompt": "What did I ask about owls?"})
    assert answer.text == "About owls.\n"
    found = fake.requests[-1].messages[-1]
    assert "asked 'What do owls do?', answered 'Owls hoot.'" in found["content"]


@pytest.mark.parametrize(
    ("folder", "said"),
    [("/nonexistent/docs", "is not a folder"), ("/proc/self/fdinfo", "holds no Markdown")],
)
async def test_ask_the_docs_refuses_a_folder_without_docs(folder: str, said: str) -> None:
    env = {**environment_without_settings(), "CHAT_CHAIN": "examples.docs:chain"}
    env["DOCS_FOLDER"] = folder
    async with python_process(
        "-m",
        "backend",
        "--port",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    ) as process:
        _, err = await asyncio.wait_for(process.communicate(), UNIT * 10)
    assert process.returncode == 2
    assert said in err.decode()


async def test_ask_the_docs_retrieves_sections_and_rewrites_follow_ups_silently(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_chain="examples.docs:chain")
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            fake.then(Behaviour(tokens=["Rejoin", " with", " after."]))
            first = await ask(ws, "How does a client resume a conversation after a reload?")
            fake.then(
                Behaviour(tokens=["How", " do", " SSE", " clients", " resume?"]),  # silent
                Behaviour(tokens=["With", " Last-Event-ID."]),
            )
            second = await ask(ws, "And over SSE?")
    assert text_of(first) == "Rejoin with after."
    found = steps_of(first, "retriever")[-1]["step"]["detail"]["documents"]
    assert found
    assert {document["source"] for document in found} <= {
        "README.md",
        "docs/protocol.md",
        "docs/benchmarks.md",
    }
    answered = fake.requests[-3].messages
    assert "[1]" in answered[0]["content"]
    assert answered[-1]["content"] == "How does a client resume a conversation after a reload?"
    # The follow-up was rewritten first, and only the answer reached the client.
    assert text_of(second) == "With Last-Event-ID."
    assert (
        steps_of(second, "retriever")[0]["step"]["detail"]["query"] == "How do SSE clients resume?"
    )
    assert fake.requests[-1].messages[-1]["content"] == "How do SSE clients resume?"


@pytest.mark.model
async def test_ask_the_docs_on_the_embedded_model() -> None:
    with live_server(local_settings(chat_chain="examples.docs:chain")) as server:
        await wait_healthy(server.http)
        async with connect(server.ws) as ws:
            await ws.send("How do I run several workers?")
            frames = await until_end(ws, within=MODEL_WAIT)
    assert frames[-1]["status"] == "completed"
    assert text_of(frames).strip()
    sources = steps_of(frames, "retriever")[-1]["step"]["detail"]["documents"]
    assert any(document["source"] == "README.md" for document in sources)
