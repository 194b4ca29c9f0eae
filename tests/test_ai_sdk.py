"""The Vercel AI SDK's `useChat` protocol, from the real `ai` package in Node, against the server.

Each chat is an `AbstractChat` with `DefaultChatTransport`, as `useChat` builds it, from each of
the SDK's majors that are tested; the tests run on both deployment shapes, so a resumed stream
may come from another worker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from backend.chat.conversation import ONLY_THE_LAST
from backend.users.auth import REFUSED
from backend.web.ai_sdk import EMPTY_QUESTION
from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import UNIT, SettingsFactory, live_server, wait_hung_up
from tests.sdk_driver import SDK_PACKAGES, reply_text, sdk_driver
from tests.test_auth import SECRET, token

COUNTING = [f"w{i} " for i in range(120)]
FULL = "".join(COUNTING)


@pytest.fixture(params=list(SDK_PACKAGES.values()), ids=list(SDK_PACKAGES))
def sdk_package(request: pytest.FixtureRequest) -> str:
    """The SDK package (one of its majors) the test's chats are made with."""
    package: str = request.param
    return package


def chat_id() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


async def stored_reply(base: str, chat: str) -> dict[str, Any]:
    """The chat's last message as the server has it (`GET /api/chat/{id}`)."""
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{base}/api/chat/{chat}")
    assert response.status_code == 200, response.text
    last: dict[str, Any] = response.json()["messages"][-1]
    assert last["role"] == "assistant"
    return last


def streamed_text(stream: str) -> str:
    """The reply text a UI message stream carried, from its `text-delta` chunks."""
    chunks = [
        json.loads(line.removeprefix("data: "))
        for line in stream.splitlines()
        if line.startswith("data: {")
    ]
    return "".join(chunk["delta"] for chunk in chunks if chunk["type"] == "text-delta")


def text_of(message: dict[str, Any]) -> str:
    return "".join(part["text"] for part in message["parts"] if part["type"] == "text")


async def test_two_turns_keep_the_history(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    async with sdk_driver(server.http, sdk_package) as sdk:
        chat = chat_id()
        await sdk.new(chat)
        first = await sdk.do("send", text="first question", wait=True)
        assert first["status"] == "ready"
        assert first["error"] is None
        assert reply_text(first) == "You said: first question"
        second = await sdk.do("send", text="second question", wait=True)
    assert [m["role"] for m in second["messages"]] == ["user", "assistant"] * 2
    assert reply_text(second) == "You said: second question"
    sent = fake.requests[-1].messages
    assert {"role": "user", "content": "first question"} in sent
    assert {"role": "assistant", "content": "You said: first question"} in sent
    assert sent[-1] == {"role": "user", "content": "second question"}
    # What our frames said beyond text is in the message: metadata and data parts.
    reply = second["messages"][-1]
    assert reply["metadata"]["status"] == "completed"
    assert reply["metadata"]["usage"]["completion_tokens"] > 0
    assert any(part["type"] == "data-info" for part in reply["parts"])
    assert (await stored_reply(server.http, chat))["id"] == reply["id"]


async def test_stop_ends_the_reply_and_the_model_request_at_once(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    fake.then(Behaviour(tokens=COUNTING, delay=0.02))
    chat = chat_id()
    async with sdk_driver(server.http, sdk_package) as sdk:
        await sdk.mid_reply(chat, "count", chars=12)
        stopped_at = time.monotonic()
        state = await sdk.do("stop")
        assert state["stopped"] == {"stopped": True}
        await wait_hung_up(fake, 0, within=UNIT)
        record = fake.requests[0]
        assert record.hung_up_at is not None
        assert record.hung_up_at - stopped_at < 1.0
        assert not record.completed
        shown = reply_text(state)
    stored = await stored_reply(server.http, chat)
    assert stored["metadata"]["status"] == "interrupted"
    text = text_of(stored)
    assert 12 <= len(shown) <= len(text) < len(FULL)
    assert FULL.startswith(text)
    assert text.startswith(shown)


async def test_a_dropped_request_is_resumed_with_the_exact_text(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    fake.then(Behaviour(tokens=COUNTING, delay=0.01))
    chat = chat_id()
    async with sdk_driver(server.http, sdk_package) as sdk:
        await sdk.mid_reply(chat, "count", chars=20)
        dropped = await sdk.do("abort")  # what a reload does to the request
        assert len(reply_text(dropped)) < len(FULL)
        # The page comes back: a new chat with the same id asks for the stream in flight.
        await sdk.new(chat, chat="reloaded")
        resumed = await sdk.do("resume", chat="reloaded", within=UNIT * 10)
        assert resumed["status"] == "ready"
        assert resumed["error"] is None
        assert reply_text(resumed) == FULL
        assert resumed["messages"][-1]["metadata"]["status"] == "completed"
        # Nothing in flight any more: the SDK is answered 204 and stays as it is.
        await sdk.new(chat, chat="later")
        later = await sdk.do("resume", chat="later")
        assert later["status"] == "ready"
        assert later["messages"] == []
    assert fake.requests[0].completed
    assert not fake.requests[0].hung_up
    assert len(fake.requests) == 1


async def test_a_request_nobody_comes_back_for_is_stopped_after_the_grace(
    make_settings: SettingsFactory, fake: FakeUpstream, sdk_package: str
) -> None:
    fake.then(Behaviour(tokens=COUNTING, delay=0.02))
    chat = chat_id()
    with live_server(make_settings(chat_resume_grace=0.5)) as server:
        async with sdk_driver(server.http, sdk_package) as sdk:
            await sdk.mid_reply(chat, "count", chars=8)
            dropped_at = time.monotonic()
            await sdk.do("abort")
            await wait_hung_up(fake, 0, within=UNIT * 2)
            record = fake.requests[0]
            assert record.hung_up_at is not None
            assert 0.4 < record.hung_up_at - dropped_at < 0.5 + UNIT / 2
        stored = await stored_reply(server.http, chat)
    assert stored["metadata"]["status"] == "interrupted"
    assert 8 <= len(text_of(stored)) < len(FULL)


async def test_an_upstream_failure_is_the_sdks_error_with_our_code(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    fake.then(Behaviour(status=401, error_message="Incorrect API key provided"))
    async with sdk_driver(server.http, sdk_package) as sdk:
        await sdk.new(chat_id())
        state = await sdk.do("send", text="hello", wait=True)
        assert state["status"] == "error"
        assert "API key" in state["error"]
        codes = [part["data"].get("code") for part in state["data"] if part["type"] == "data-error"]
        assert codes == ["upstream_auth"]
        # The chat goes on: the next question is answered.
        state = await sdk.do("send", text="again", wait=True)
    assert state["status"] == "ready"
    assert reply_text(state) == "You said: again"


async def test_a_refused_request_is_the_sdks_error_as_the_sentence(
    make_settings: SettingsFactory, fake: FakeUpstream, sdk_package: str
) -> None:
    """The SDK makes a refused response's whole body its error's message: that is the sentence."""
    settings = make_settings(
        chat_auth="token", chat_jwt_secret=SECRET, chat_quota_questions="1 per 30 seconds"
    )
    alice = {"Authorization": f"Bearer {token('alice')}"}
    with live_server(settings) as server:
        async with sdk_driver(server.http, sdk_package) as sdk:
            await sdk.new(chat_id(), chat="signed out")
            signed_out = await sdk.do("send", chat="signed out", text="hi", wait=True)
            await sdk.new(chat_id(), **alice)
            empty = await sdk.do("send", text="   ", wait=True)
            answered = await sdk.do("send", text="hi", wait=True)
            limited = await sdk.do("send", text="more", wait=True)
    assert signed_out["status"] == "error"
    assert signed_out["error"] == REFUSED
    assert empty["status"] == "error"
    assert empty["error"] == EMPTY_QUESTION
    assert answered["error"] is None
    assert reply_text(answered) == "You said: hi"
    assert limited["status"] == "error"
    assert limited["error"].startswith("You have asked 1 question per 30 seconds, the most allowed")
    assert len(fake.requests) == 1


async def test_regenerate_replaces_the_last_reply(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    fake.then(Behaviour(tokens=["first ", "take"]), Behaviour(tokens=["second ", "take"]))
    chat = chat_id()
    async with sdk_driver(server.http, sdk_package) as sdk:
        await sdk.new(chat)
        first = await sdk.do("send", text="tell me", wait=True)
        assert reply_text(first) == "first take"
        state = await sdk.do("regenerate")
    assert state["status"] == "ready"
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
    assert reply_text(state) == "second take"
    assert state["messages"][-1]["id"] != first["messages"][-1]["id"]
    assert fake.requests[1].messages[-1] == {"role": "user", "content": "tell me"}
    async with httpx.AsyncClient(timeout=UNIT) as client:
        messages = (await client.get(f"{server.http}/api/chat/{chat}")).json()["messages"]
    assert [text_of(m) for m in messages] == ["tell me", "second take"]


async def test_editing_the_last_question_replaces_the_turn(
    server: Addressed, fake: FakeUpstream, sdk_package: str
) -> None:
    """`sendMessage` with the last question's `messageId` edits it: the question and its reply
    are replaced in the store and in what the model is sent; an earlier one is refused."""
    fake.then(
        Behaviour(tokens=["about ", "cats"]),
        Behaviour(tokens=["about ", "dogs"]),
        Behaviour(tokens=["more ", "dogs"]),
        Behaviour(tokens=["cats ", "too"]),
        Behaviour(tokens=["dogs ", "again"]),
    )
    chat = chat_id()
    async with sdk_driver(server.http, sdk_package) as sdk:
        await sdk.new(chat)
        await sdk.do("send", text="tell me about cats", wait=True)
        edited = await sdk.do("edit", index=-1, text="tell me about dogs")
        assert edited["error"] is None
        assert [text_of(m) for m in edited["messages"]] == ["tell me about dogs", "about dogs"]
        await sdk.do("send", text="more", wait=True)
        # A question the server refused stays in the chat; edited, it is a new question, and
        # the turns before it are kept.
        too_long = await sdk.do("send", text="x" * 20_000, wait=True)
        assert too_long["error"] is not None
        kept = await sdk.do("edit", index=-1, text="and cats?")
        assert kept["error"] is None
        refused = await sdk.do("edit", index=0, text="tell me about birds")
        assert refused["error"] == ONLY_THE_LAST
        # Started from the server's messages (as after a reload), the ids are the server's.
        async with httpx.AsyncClient(timeout=UNIT) as client:
            loaded = (await client.get(f"{server.http}/api/chat/{chat}")).json()["messages"]
        await sdk.do("new", "b", id=chat, api=sdk.api, headers={}, messages=loaded)
        again = await sdk.do("edit", "b", index=-1, text="dogs, again")
        assert again["error"] is None
    assert fake.requests[1].messages[-1] == {"role": "user", "content": "tell me about dogs"}
    assert "cats" not in json.dumps(fake.requests[2].messages)
    assert len(fake.requests) == 5
    assert fake.requests[4].messages[-3:] == [
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "more dogs"},
        {"role": "user", "content": "dogs, again"},
    ]
    async with httpx.AsyncClient(timeout=UNIT) as client:
        messages = (await client.get(f"{server.http}/api/chat/{chat}")).json()["messages"]
    assert [text_of(m) for m in messages] == [
        "tell me about dogs",
        "about dogs",
        "more",
        "more dogs",
        "dogs, again",
        "dogs again",
    ]
    assert fake.requests[3].messages[-1] == {"role": "user", "content": "and cats?"}


# The protocol itself, from a plain HTTP client.


def body(chat: str, *messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    """A request as `DefaultChatTransport` sends it, with these (role, text) messages."""
    return {
        "id": chat,
        "trigger": "submit-message",
        "messageId": None,
        "messages": [
            {"id": f"m{i}", "role": role, "parts": [{"type": "text", "text": text}]}
            for i, (role, text) in enumerate(messages)
        ],
        **extra,
    }


async def test_the_stream_is_the_ui_message_stream_protocol(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=["Hello", " world"]))
    chat = chat_id()
    async with (
        httpx.AsyncClient(timeout=UNIT) as client,
        client.stream("POST", f"{server.http}/api/chat", json=body(chat, ("user", "hi"))) as got,
    ):
        assert got.status_code == 200
        assert got.headers["x-vercel-ai-ui-message-stream"] == "v1"
        assert got.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in got.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    kinds = [c["type"] for c in chunks if c["type"] != "data-info"]
    assert kinds[:2] == ["start", "text-start"]
    assert kinds[-2:] == ["text-end", "finish"]
    assert set(kinds[2:-2]) == {"text-delta"}
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "Hello world"
    start, finish = chunks[0], chunks[-1]
    assert start["messageId"].startswith("a")
    assert finish["finishReason"] == "stop"
    assert finish["messageMetadata"]["conversation"] == start["messageMetadata"]["conversation"]


async def test_the_servers_history_wins_over_the_clients(
    server: Addressed, fake: FakeUpstream
) -> None:
    chat = chat_id()
    async with httpx.AsyncClient(timeout=UNIT) as client:
        first = await client.post(f"{server.http}/api/chat", json=body(chat, ("user", "real")))
        assert first.status_code == 200
        # A client that sends a history of its own making: only its last message is read.
        forged = body(chat, ("user", "forged"), ("assistant", "made up"), ("user", "next"))
        second = await client.post(f"{server.http}/api/chat", json=forged)
        assert second.status_code == 200
    sent = [(m["role"], m["content"]) for m in fake.requests[-1].messages if m["role"] != "system"]
    assert sent == [("user", "real"), ("assistant", "You said: real"), ("user", "next")]


async def test_bad_requests_are_4xx_with_a_reason(server: Addressed, fake: FakeUpstream) -> None:
    chat = chat_id()
    cases: list[tuple[Any, str]] = [
        ("not json", "must be JSON"),
        ({"messages": []}, "id"),
        (body(chat), "last message must be the user's"),
        (body(chat, ("user", "a"), ("assistant", "b")), "last message must be the user's"),
        (body(chat, ("user", "   ")), "The question is empty"),
        (body(chat, ("user", "hi"), trigger="bogus"), "trigger"),
        (body(chat, trigger="regenerate-message"), "nothing to regenerate"),
        (body("x" * 300, ("user", "hi")), "id"),
        ({**body(chat), "messages": [{"role": "robot", "parts": []}]}, "messages.0.role"),
        ({**body(chat), "messages": [{"role": "user", "parts": "hi"}]}, "messages.0.parts"),
    ]
    async with httpx.AsyncClient(timeout=UNIT) as client:
        for sent, reason in cases:
            if isinstance(sent, str):
                response = await client.post(f"{server.http}/api/chat", content=sent)
            else:
                response = await client.post(f"{server.http}/api/chat", json=sent)
            assert response.status_code == 422, (sent, response.text)
            assert response.headers["content-type"].startswith("text/plain"), response.headers
            assert reason in response.text, (sent, response.text)
        # A client that asks for JSON gets the sentence as the other routes send it.
        response = await client.post(
            f"{server.http}/api/chat", json=body(chat), headers={"Accept": "application/json"}
        )
        assert response.status_code == 422
        assert response.json() == {"detail": "The last message must be the user's new question."}
        # None of it touched the chat: it still answers, and nothing reached the model before.
        assert fake.requests == []
        response = await client.post(f"{server.http}/api/chat", json=body(chat, ("user", "ok")))
        assert response.status_code == 200
        assert streamed_text(response.text) == "You said: ok"
        missing = chat_id()
        unknown = await client.post(f"{server.http}/api/chat/{missing}/stop")
        assert (unknown.status_code, unknown.text) == (404, f"No chat {missing!r}.")
        assert (await client.get(f"{server.http}/api/chat/{chat_id()}/stream")).status_code == 204
        assert (await client.get(f"{server.http}/api/chat/{chat_id()}")).status_code == 404


async def test_tokens_and_quotas_apply(make_settings: SettingsFactory, fake: FakeUpstream) -> None:
    settings = make_settings(
        chat_auth="token", chat_jwt_secret=SECRET, chat_quota_questions="1 per 30 seconds"
    )
    chat = chat_id()
    alice = {"Authorization": f"Bearer {token('alice')}"}
    bob = {"Authorization": f"Bearer {token('bob')}"}
    with live_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            signed_out = await client.post("/api/chat", json=body(chat, ("user", "hi")))
            assert signed_out.status_code == 401
            assert signed_out.headers["WWW-Authenticate"] == "Bearer"
            assert signed_out.text == REFUSED
            assert (await client.get(f"/api/chat/{chat}/stream")).status_code == 401
            answered = await client.post(
                "/api/chat", json=body(chat, ("user", "hi")), headers=alice
            )
            assert answered.status_code == 200
            assert streamed_text(answered.text) == "You said: hi"
            again = await client.post("/api/chat", json=body(chat, ("user", "more")), headers=alice)
            assert again.status_code == 429
            assert 0 < int(again.headers["Retry-After"]) <= 30
            assert again.text.startswith("You have asked 1 question per 30 seconds")
            # The same chat id is another chat for another user: Bob cannot see Alice's.
            assert (await client.get(f"/api/chat/{chat}", headers=bob)).status_code == 404
            mine = (await client.get(f"/api/chat/{chat}", headers=alice)).json()
            assert [text_of(m) for m in mine["messages"]] == ["hi", "You said: hi"]
            listed = (await client.get("/api/conversations", headers=alice)).json()
    assert mine["conversation"] in {c["id"] for c in listed["conversations"]}


async def test_a_chats_next_question_does_not_read_the_store(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    """Each question is a request of its own; the conversation stays in memory between them."""
    with live_server(make_settings()) as server:
        store = server.app.state.conversations.store
        loads: list[str] = []
        load = store.load

        async def counted(conversation_id: str) -> Any:
            loads.append(conversation_id)
            return await load(conversation_id)

        store.load = counted
        chat = chat_id()
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            for question in ["one", "two", "three"]:
                answered = await client.post("/api/chat", json=body(chat, ("user", question)))
                assert streamed_text(answered.text) == f"You said: {question}"
                await asyncio.sleep(1.2)  # past the writer's tick, which stores the turn
    assert len(loads) == 1  # the first question's, to learn the chat is new
    assert [m["content"] for m in fake.requests[-1].messages if m["role"] == "user"] == [
        "one",
        "two",
        "three",
    ]


async def test_a_stream_over_the_connection_quota_is_refused_before_the_model_is_asked(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=COUNTING, delay=0.02))
    with live_server(make_settings(chat_quota_connections=1)) as server:
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            first = body(chat_id(), ("user", "count"))
            async with client.stream("POST", "/api/chat", json=first) as streaming:
                assert streaming.status_code == 200
                await fake.arrived(1)
                second = await client.post("/api/chat", json=body(chat_id(), ("user", "hi")))
                assert second.status_code == 429
                assert "1 connection open" in second.text
                resumed = await client.get(f"/api/chat/{first['id']}/stream")
                assert resumed.status_code == 429
            assert len(fake.requests) == 1
