"""Your own chain, served: by import string, invoked with the conversation as messages, its
silent steps silent, its failures said with a code and a sentence."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from backend.model.assistants import BUILT_IN_DESCRIPTION, ChainImportError
from backend.web.app import create_app
from deploy.services import Postgres, Redis
from fakes.openai_server import Behaviour, FakeUpstream
from tests.chains import SLOW_TOOL
from tests.conftest import fake_settings
from tests.harness import (
    UNIT,
    Frame,
    LiveServer,
    ask,
    close_of,
    connect,
    conversation_of,
    kinds,
    live_server,
    recv,
    text_of,
    until_end,
    wait_hung_up,
)
from tests.sdk_driver import SDK_PACKAGES, reply_text, sdk_driver


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
        ("tests.chains:not_a_chain", "it is an int, not a LangChain Runnable"),
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


@pytest.fixture(scope="module")
def two_assistants(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    """The built-in chain (the default) and `shout`, in one server."""
    settings = fake_settings(upstream_server, chat_chains=["shout=tests.chains:shouting"])
    with live_server(settings) as server:
        yield server


async def test_each_conversation_is_answered_by_the_assistant_it_was_opened_with(
    two_assistants: LiveServer,
) -> None:
    server = two_assistants
    async with connect(f"{server.ws}?assistant=shout") as ws:
        shouted = conversation_of(ws)
        assert text_of(await ask(ws, "hello")) == "HELLO (1 messages)"
    async with connect(server.ws) as ws:
        plain = conversation_of(ws)
        assert text_of(await ask(ws, "hello")) == "You said: hello"
    # Rejoined without naming it, the conversation keeps its assistant; a reset, too.
    async with connect(f"{server.ws}?conversation={shouted}") as ws:
        assert kinds(await until_end(ws))[-1] == "end"
        assert text_of(await ask(ws, "more")) == "MORE (3 messages)"
        await ws.send(json.dumps({"type": "reset"}))
        assert (await recv(ws))["message"] == "Conversation cleared."
        assert text_of(await ask(ws, "anew")) == "ANEW (1 messages)"
    async with httpx.AsyncClient(timeout=UNIT) as client:
        listed = (await client.get(f"{server.http}/api/conversations")).json()
        read = (await client.get(f"{server.http}/api/conversations/{shouted}")).json()
        offered = (await client.get(f"{server.http}/api/assistants")).json()
    by_id = {entry["id"]: entry["assistant"] for entry in listed["conversations"]}
    assert (by_id[shouted], by_id[plain]) == ("shout", "chat")
    assert read["assistant"] == "shout"
    assert offered == {
        "assistants": [
            {"name": "chat", "description": BUILT_IN_DESCRIPTION, "default": True},
            {
                "name": "shout",
                "description": "Chains of a user's own, served by import string in the tests "
                "(`CHAT_CHAIN=tests.chains:...`).",
                "default": False,
            },
        ]
    }


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("assistant=nope", "No assistant 'nope'; this server offers chat, shout."),
        ("assistant=", "No assistant ''; this server offers chat, shout."),
    ],
)
async def test_an_assistant_the_server_does_not_offer_is_refused(
    two_assistants: LiveServer, query: str, reason: str
) -> None:
    async with ws_connect(f"{two_assistants.ws}?{query}") as ws:
        code, text = await close_of(ws)
    assert (code, text) == (1008, reason)


async def test_a_conversation_is_not_joined_as_another_assistants(
    two_assistants: LiveServer,
) -> None:
    server = two_assistants
    async with connect(f"{server.ws}?assistant=shout") as ws:
        conversation = conversation_of(ws)
        await ask(ws, "hello")
    async with ws_connect(f"{server.ws}?conversation={conversation}&assistant=chat") as ws:
        code, text = await close_of(ws)
    assert code == 1008
    assert text == "This conversation is answered by 'shout'; begin a new one to ask 'chat'."


async def test_the_http_routes_take_the_assistant_too(two_assistants: LiveServer) -> None:
    server = two_assistants
    async with httpx.AsyncClient(timeout=UNIT) as client:
        streamed = await client.get(f"{server.http}/stream?prompt=hi&assistant=shout")
        refused = await client.get(f"{server.http}/stream?prompt=hi&assistant=nope")
        chat = uuid.uuid4().hex[:16]
        sdk = await client.post(
            f"{server.http}/api/chat",
            json={
                "id": chat,
                "messages": [
                    {"id": "m0", "role": "user", "parts": [{"type": "text", "text": "yo"}]}
                ],
                "assistant": "shout",
            },
        )
    assert streamed.text == "HI (1 messages)\n"
    assert refused.status_code == 422
    assert refused.json()["detail"] == "No assistant 'nope'; this server offers chat, shout."
    deltas = [
        json.loads(line.removeprefix("data: "))
        for line in sdk.text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(d["delta"] for d in deltas if d["type"] == "text-delta") == "YO (1 messages)"


async def test_a_conversation_begun_on_one_worker_keeps_its_assistant_on_another(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    """Nothing is stored yet when the question comes to the other worker: the assistant
    travels with the conversation's id."""
    settings = fake_settings(
        upstream_server,
        chat_database_url=postgres.database(),
        chat_redis_url=redis_server.url,
        chat_chains=["shout=tests.chains:shouting"],
    )
    with live_server(settings) as one, live_server(settings) as two:
        async with connect(f"{one.ws}?assistant=shout") as opened:
            conversation = conversation_of(opened)
            async with connect(f"{two.ws}?conversation={conversation}") as other:
                assert text_of(await ask(other, "hello")) == "HELLO (1 messages)"


def readme_example() -> tuple[str, str]:
    """The README's own-chain example, verbatim: its Python module and the `CHAT_CHAIN` value
    its command serves it with."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Your own chain") :]
    section = section[: section.index("\n## ", 1)]
    module = re.findall(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    command = re.search(r"^CHAT_CHAIN=(\S+) make run$", section, re.MULTILINE)
    assert len(module) == 1
    assert command is not None
    return str(module[0]), command.group(1)


async def test_the_readmes_own_chain_example_serves_as_written(
    upstream_server: FakeUpstream,
    fake: FakeUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module, spec = readme_example()
    name = spec.partition(":")[0]
    (tmp_path / f"{name}.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake.then(Behaviour(tokens=["Arr,", " hello."]))
    with live_server(fake_settings(upstream_server, chat_chain=spec)) as server:
        async with connect(server.ws) as ws:
            first = await ask(ws, "hello")
            await ask(ws, "and then?")
        async with httpx.AsyncClient(timeout=UNIT) as client:
            offered = (await client.get(f"{server.http}/api/assistants")).json()
    assert text_of(first) == "Arr, hello."
    sent = [(m["role"], m["content"]) for m in fake.requests[-1].messages]
    assert sent == [
        ("system", "You are a pirate. Answer like one."),
        ("user", "hello"),
        ("assistant", "Arr, hello."),
        ("user", "and then?"),
    ]
    assert offered["assistants"][-1] == {
        "name": name,
        "description": "Answers like a pirate.",
        "default": True,
    }


def steps_in(frames: list[Frame]) -> list[tuple[str, str, str]]:
    return [
        (f["step"]["kind"], f["step"]["name"], f["step"]["status"]) for f in frames if "step" in f
    ]


STEPS = [
    ("retriever", "Shelf", "started"),
    ("retriever", "Shelf", "completed"),
    ("tool", "divide", "started"),
    ("tool", "divide", "completed"),
    ("chain", "polish", "started"),
    ("chain", "polish", "completed"),
]


async def test_the_steps_of_a_chain_are_info_frames_stored_and_replayed(
    upstream_server: FakeUpstream,
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:stepping")
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            conversation = conversation_of(ws)
            frames = await ask(ws, "ships?")
        assert steps_in(frames) == STEPS
        by_status = {(f["step"]["name"], f["step"]["status"]): f for f in frames if "step" in f}
        searched = by_status[("Shelf", "started")]
        assert searched["type"] == "info"
        assert searched["message"] == "Searching for 'ships?'"
        assert searched["step"]["detail"] == {"query": "ships?"}
        found = by_status[("Shelf", "completed")]["step"]["detail"]
        assert found["documents"] == [
            {"title": "Lighthouses", "source": "a.md"},
            {"source": "b.md"},
        ]
        assert by_status[("Shelf", "completed")]["message"].startswith(
            "Found 2 documents: Lighthouses, b.md ("
        )
        called = by_status[("divide", "started")]
        assert called["message"] == 'Calling divide with {"numerator": 6, "denominator": 3}'
        assert called["step"]["detail"] == {"arguments": {"numerator": 6, "denominator": 3}}
        returned = by_status[("divide", "completed")]["step"]
        assert returned["detail"]["result"] == "2.0"
        assert returned["id"] == called["step"]["id"]
        assert text_of(frames) == "2 documents, 2.0"
        # Replayed to a client that joins, and from the middle to one that resumes, once each.
        async with connect(f"{server.ws}?conversation={conversation}") as ws:
            replayed = await until_end(ws)
        assert steps_in(replayed) == STEPS
        middle = by_status[("divide", "started")]["seq"]
        async with connect(f"{server.ws}?conversation={conversation}&after={middle}") as ws:
            resumed = await until_end(ws)
        assert steps_in(resumed) == STEPS[3:]
        # From every point: exactly what came after it, each step frame once.
        for after in [frame["seq"] for frame in frames[:-1]]:
            url = f"{server.ws}?conversation={conversation}&after={after}"
            async with connect(url) as ws:
                rest = await until_end(ws)
            expected = [f for f in frames if f["seq"] > after]
            assert [f for f in rest if f["type"] != "stream"] == [
                f for f in expected if f["type"] != "stream"
            ]
            assert text_of(rest) == text_of(expected)
        async with httpx.AsyncClient(timeout=UNIT) as client:
            stored = (await client.get(f"{server.http}/api/conversations/{conversation}")).json()
    steps = stored["messages"][1]["steps"]
    assert [(s["kind"], s["name"], s["status"]) for s in steps] == [
        ("retriever", "Shelf", "completed"),
        ("tool", "divide", "completed"),
        ("chain", "polish", "completed"),
    ]
    assert steps[1]["detail"]["arguments"] == {"numerator": 6, "denominator": 3}
    assert steps[1]["detail"]["result"] == "2.0"


async def test_a_tool_that_raises_is_a_step_with_its_error(upstream_server: FakeUpstream) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:calculating")
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "1/0?")
    assert steps_in(frames) == [("tool", "divide", "started"), ("tool", "divide", "error")]
    failed = [f for f in frames if "step" in f][-1]
    assert failed["message"] == "divide failed: ZeroDivisionError: float division by zero"
    assert failed["step"]["detail"]["error"] == "ZeroDivisionError: float division by zero"


async def test_the_ai_sdk_route_shows_tool_calls_as_tool_parts(
    upstream_server: FakeUpstream,
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:stepping")
    with live_server(settings) as server:
        chat = uuid.uuid4().hex[:16]
        question = {"id": "m0", "role": "user", "parts": [{"type": "text", "text": "ships?"}]}
        async with httpx.AsyncClient(timeout=UNIT) as client:
            streamed = await client.post(
                f"{server.http}/api/chat", json={"id": chat, "messages": [question]}
            )
            stored = (await client.get(f"{server.http}/api/chat/{chat}")).json()
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    kinds = [c["type"] for c in chunks if c["type"] not in ("data-info",)]
    called = next(c for c in chunks if c["type"] == "tool-input-available")
    assert called["toolName"] == "divide"
    assert called["input"] == {"numerator": 6, "denominator": 3}
    assert called["dynamic"] is True
    returned = next(c for c in chunks if c["type"] == "tool-output-available")
    assert (returned["toolCallId"], returned["output"]) == (called["toolCallId"], "2.0")
    # The text before the call and after it are parts of their own, around the tool's.
    tool_at = kinds.index("tool-input-available")
    assert kinds[tool_at - 1] == "text-end"
    assert kinds.count("text-start") == 2
    assert [c["data"]["name"] for c in chunks if c["type"] == "data-step"] == [
        "Shelf",
        "Shelf",
        "polish",
        "polish",
    ]
    parts = stored["messages"][-1]["parts"]
    tool = next(p for p in parts if p["type"] == "dynamic-tool")
    assert tool["state"] == "output-available"
    assert (tool["toolName"], tool["input"], tool["output"]) == (
        "divide",
        {"numerator": 6, "denominator": 3},
        "2.0",
    )
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert "".join(texts) == "2 documents, 2.0"
    # A step's start and end share an id, so the end replaces the start: one part each.
    live_ids = [c["id"] for c in chunks if c["type"] == "data-step"]
    assert live_ids[0] == live_ids[1] != live_ids[2] == live_ids[3]
    kept = [(p["data"]["name"], p["data"]["status"]) for p in parts if p["type"] == "data-step"]
    assert kept == [("Shelf", "completed"), ("polish", "completed")]


async def test_an_agent_streams_its_tool_calls_and_keeps_them_as_history(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    """A `create_agent` agent: the model calls a tool (its arguments streamed in pieces),
    the tool runs, the model answers. The next question is sent the whole turn, the call
    right before its result."""
    settings = fake_settings(upstream_server, chat_chain="tests.chains:agent")
    fake.then(
        Behaviour(tool_calls=[("add", {"a": 2, "b": 3})]),
        Behaviour(tokens=["The", " sum", " is", " 5."]),
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "2+3?")
            again = await ask(ws, "and twice that?")
    assert text_of(frames) == "The sum is 5."
    tools = [step for step in steps_in(frames) if step[0] == "tool"]
    assert tools == [("tool", "add", "started"), ("tool", "add", "completed")]
    assert ("chain", "tools", "completed") in steps_in(frames)
    # Both model calls count: each has its usage chunk.
    calls = fake.requests[-3:-1]
    assert frames[-1]["usage"]["completion_tokens"] == sum(c.tokens_sent for c in calls)
    assert text_of(again) == "You said: and twice that?"
    sent = fake.requests[-1].messages
    roles = [m["role"] for m in sent]
    assert roles == ["user", "assistant", "tool", "assistant", "user"]
    call = sent[1]["tool_calls"][0]
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == (
        "add",
        {"a": 2, "b": 3},
    )
    assert (sent[2]["tool_call_id"], sent[2]["content"]) == (call["id"], "5.0")
    assert sent[3]["content"] == "The sum is 5."


async def stop_when(ws: ClientConnection, seen: Callable[[Frame], bool]) -> list[Frame]:
    """Read frames until one satisfies `seen`, send stop, then read to the reply's end."""
    frames: list[Frame] = []
    while not frames or not seen(frames[-1]):
        frames.append(await recv(ws))
    await ws.send(json.dumps({"type": "stop"}))
    return frames + await until_end(ws)


async def test_stop_during_a_tool_run_cancels_the_tool(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:patient_agent")
    fake.then(Behaviour(tool_calls=[("wait_for_it", {"seconds": 30})]))
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            await ws.send("wait, please")
            frames = await stop_when(
                ws,
                lambda f: f.get("step", {}).get("status") == "started" and "wait" in f["message"],
            )
            stopped = time.monotonic()
            assert frames[-1]["status"] == "interrupted"
            assert SLOW_TOOL["cancelled"] is True
            assert stopped - SLOW_TOOL["started"] < UNIT
            # Every step under way is closed as interrupted, just before the `end`.
            steps = [f["step"] for f in frames if "step" in f]
            assert {s["status"] for s in steps if s["kind"] == "tool"} == {
                "started",
                "interrupted",
            }
            assert steps[-1]["status"] == "interrupted"
            assert steps[-1]["detail"]["error"] == "Stopped before it finished."
            assert kinds(frames)[-2:] == ["info", "end"]
            async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
                stored = await client.get(f"/api/conversations/{conversation_of(ws)}")
            listed = stored.json()["messages"][1]["steps"]
            assert listed
            assert "started" not in {s["status"] for s in listed}
            assert listed[-1]["status"] == "interrupted"
            assert "error" not in {s["status"] for s in listed}
            # The call never had its result, and nothing was said: no history goes with the
            # next question (a call without its result would be refused by the model).
            await ask(ws, "next")
    assert [m["role"] for m in fake.requests[-1].messages] == ["user"]


async def test_stop_during_an_agents_second_model_call_closes_its_request(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:agent")
    fake.then(
        Behaviour(tool_calls=[("add", {"a": 1, "b": 1})]),
        Behaviour(tokens=[" two"] * 500, delay=0.01),
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            first = len(fake.requests)
            await ws.send("1+1?")
            frames = await stop_when(ws, lambda f: f["type"] == "stream" and f["sender"] == "bot")
            await wait_hung_up(fake, first + 1)
            assert frames[-1]["status"] == "interrupted"
            assert text_of(frames).startswith(" two")
            await ask(ws, "next")
    # The interrupted turn goes back whole: its call, its result, and the text it got to.
    roles = [m["role"] for m in fake.requests[-1].messages]
    assert roles == ["user", "assistant", "tool", "assistant", "user"]


async def test_usage_counts_every_model_call_when_the_server_reports_none(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    """Counted from what each call was sent and wrote, the silent rewrite included; and a
    chain that calls no model reports no usage."""
    settings = fake_settings(upstream_server, chat_chain="tests.chains:condensed")
    fake.then(
        Behaviour(tokens=["What is up, really, in full?"], usage=False),
        Behaviour(tokens=["All", " fine."], usage=False),
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            both = (await ask(ws, "sup"))[-1]["usage"]
    fake.then(Behaviour(tokens=["All", " fine."], usage=False))
    one_call = fake_settings(upstream_server, chat_chain="tests.chains:like_built_in")
    with live_server(one_call) as server:
        async with connect(server.ws) as ws:
            alone = (await ask(ws, "sup"))[-1]["usage"]
    assert both["estimated"] is True
    assert both["completion_tokens"] > alone["completion_tokens"] > 0
    no_model = fake_settings(upstream_server, chat_chain="tests.chains:shouting")
    with live_server(no_model) as server:
        async with connect(server.ws) as ws:
            assert "usage" not in (await ask(ws, "hello"))[-1]


async def test_a_silent_step_sends_no_info_either(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    settings = fake_settings(upstream_server, chat_chain="tests.chains:condensed")
    fake.then(Behaviour(tokens=["Rewritten"]), Behaviour(tokens=["Answer"]))
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            frames = await ask(ws, "sup")
    asking = [f["message"] for f in frames if f["message"].startswith("Asking")]
    assert asking == ["Asking fake-model (1 message of context)"]


@pytest.mark.parametrize(
    ("chains", "reason"),
    [
        (["chat=tests.chains:shouting"], "the name 'chat' is the built-in chain's"),
        (["a=tests.chains:shouting", "a=tests.chains:broken"], "the name 'a' is taken twice"),
        (["Loud=tests.chains:shouting"], "expected name=package.module:attribute"),
    ],
)
def test_assistant_names_are_checked_at_start(
    upstream_server: FakeUpstream, chains: list[str], reason: str
) -> None:
    with pytest.raises(ChainImportError) as refused:
        create_app(fake_settings(upstream_server, chat_chains=chains))
    assert reason in str(refused.value)


@pytest.mark.parametrize("package", list(SDK_PACKAGES.values()), ids=list(SDK_PACKAGES))
async def test_the_real_ai_package_shows_a_tool_call_as_a_tool_part(
    upstream_server: FakeUpstream, package: str
) -> None:
    """`useChat`'s own state machine (the `ai` package in Node) takes our stream: the tool
    call is a `dynamic-tool` part with its input and output, between the reply's texts."""
    settings = fake_settings(upstream_server, chat_chain="tests.chains:stepping")
    with live_server(settings) as server:
        async with sdk_driver(server.http, package) as sdk:
            await sdk.new(uuid.uuid4().hex[:16])
            state = await sdk.do("send", text="ships?", wait=True)
    assert state["error"] is None
    reply = state["messages"][-1]
    tools = [part for part in reply["parts"] if part["type"] == "dynamic-tool"]
    assert [(t["toolName"], t["state"], t["input"], t["output"]) for t in tools] == [
        ("divide", "output-available", {"numerator": 6, "denominator": 3}, "2.0")
    ]
    assert reply_text(state) == "2 documents, 2.0"
    steps = [part["data"] for part in reply["parts"] if part["type"] == "data-step"]
    assert [(step["name"], step["status"]) for step in steps] == [
        ("Shelf", "completed"),
        ("polish", "completed"),
    ]


async def test_a_chain_that_acted_is_not_run_again_on_a_retryable_failure(
    upstream_server: FakeUpstream, fake: FakeUpstream
) -> None:
    """The first model call failing before anything happened is retried, as for the built-in
    chain; the second failing after a tool ran is not (the tool would run twice)."""
    settings = fake_settings(upstream_server, chat_chain="tests.chains:agent")
    fake.then(
        Behaviour(status=503),
        Behaviour(tool_calls=[("add", {"a": 1, "b": 2})]),
        Behaviour(status=503),
    )
    with live_server(settings) as server:
        async with connect(server.ws) as ws:
            before = len(fake.requests)
            frames = await ask(ws, "1+2?")
    assert len(fake.requests) - before == 3
    assert [s for s in steps_in(frames) if s[0] == "tool"] == [
        ("tool", "add", "started"),
        ("tool", "add", "completed"),
    ]
    errors = [f["code"] for f in frames if f["type"] == "error"]
    assert errors == ["upstream_unavailable"]
