"""`/api/conversations` (list, read, delete) and joining a conversation over SSE."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import httpx
from websockets.asyncio.client import connect as ws_connect

from deploy.services import Addressed
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    UNIT,
    Frame,
    SettingsFactory,
    ask,
    close_of,
    connect,
    conversation_of,
    live_server,
    recv,
    text_of,
    until_end,
    until_reply_text,
)


async def events(response: httpx.Response) -> AsyncIterator[tuple[str | None, Frame]]:
    """(id, frame) for each SSE event of `response`, as they arrive."""
    event_id: str | None = None
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            yield event_id, json.loads(line[6:])
            event_id = None


async def test_list_get_and_delete(make_settings: SettingsFactory, fake: FakeUpstream) -> None:
    with live_server(make_settings()) as server:
        ids = []
        for n in range(3):
            async with connect(server.ws) as ws:
                ids.append(conversation_of(ws))
                await ask(ws, f"question {n}\nwith a second line")
                if n == 2:
                    await ask(ws, "and a follow-up")
        async with connect(server.ws):
            pass  # a conversation nothing was asked in is not listed
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            page = (await client.get("/api/conversations", params={"limit": 2})).json()
            assert [c["id"] for c in page["conversations"]] == [ids[2], ids[1]]
            assert page["conversations"][0]["title"] == "question 2 with a second line"
            assert page["conversations"][0]["messages"] == 4
            assert page["next_offset"] == 2
            rest = (await client.get("/api/conversations", params={"offset": 2})).json()
            assert [c["id"] for c in rest["conversations"]] == [ids[0]]
            assert rest["next_offset"] is None

            one = (await client.get(f"/api/conversations/{ids[2]}")).json()
            assert [(m["role"], m["text"], m.get("status")) for m in one["messages"]] == [
                ("user", "question 2\nwith a second line", None),
                ("assistant", "You said: question 2\nwith a second line", "completed"),
                ("user", "and a follow-up", None),
                ("assistant", "You said: and a follow-up", "completed"),
            ]

            assert (await client.delete(f"/api/conversations/{ids[1]}")).status_code == 204
            assert (await client.get(f"/api/conversations/{ids[1]}")).status_code == 404
            assert (await client.delete(f"/api/conversations/{ids[1]}")).status_code == 404
            assert (await client.get("/api/conversations/not-an-id")).status_code == 404
            listed = (await client.get("/api/conversations")).json()["conversations"]
            assert [c["id"] for c in listed] == [ids[2], ids[0]]
        async with ws_connect(f"{server.ws}?conversation={ids[1]}") as ws:
            assert (await close_of(ws))[0] == 1008


async def test_search_and_rename(server: Addressed, fake: FakeUpstream) -> None:
    """A conversation is found by a word of a reply; renamed, it keeps its name as it goes on,
    wherever it is answered, and is found by it; bad names and ids are refused."""
    word = f"zebra{uuid.uuid4().hex[:8]}"
    async with connect(server.ws) as ws:
        found_id = conversation_of(ws)
        await ask(ws, f"Tell me about the {word}s")  # answered "You said: ..."
    async with connect(server.ws) as ws:
        other_id = conversation_of(ws)
        await ask(ws, "Something else")
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:

        async def search(q: str) -> list[str]:
            response = await client.get("/api/conversations", params={"q": q, "limit": 100})
            assert response.status_code == 200, response.text
            return [c["id"] for c in response.json()["conversations"]]

        assert await search(word.upper()) == [found_id]
        assert await search(f"{word[:-2]} tell") == [found_id]
        assert await search(f"{word} else") == []
        renamed = await client.patch(
            f"/api/conversations/{found_id}", json={"title": f"  Stripes {word}x  "}
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["title"] == f"Stripes {word}x"
        assert renamed.json()["messages"] == 2
        for bad, sentence in [
            ({"title": "   "}, "empty"),
            ({"title": "x" * 201}, "200 characters"),
            ({"title": "two\nlines"}, "one line"),
            ({"title": "two\u2028lines"}, "one line"),
            ({"title": "a\u0085b"}, "one line"),
            ({"name": "x"}, "title"),
            ([], "JSON object"),
        ]:
            refused = await client.patch(f"/api/conversations/{other_id}", json=bad)
            assert refused.status_code == 422, (bad, refused.text)
            assert sentence in refused.json()["detail"], refused.text
            assert "Value error" not in refused.json()["detail"]
        bodiless = await client.patch(f"/api/conversations/{other_id}")
        assert bodiless.status_code == 422
        assert "body is missing" in bodiless.json()["detail"]
        for missing in ("a" * 32, "not-an-id"):
            absent = await client.patch(f"/api/conversations/{missing}", json={"title": "x"})
            assert absent.status_code == 404
    # Going on (and an edit of the first question) never retitles it.
    async with connect(f"{server.ws}?conversation={found_id}") as ws:
        await ws.send(json.dumps({"type": "regenerate", "message": "Edited first question"}))
        await until_end(ws)
        await ask(ws, "More please")
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        [listed] = (
            await client.get("/api/conversations", params={"q": f"stripes {word}x"})
        ).json()["conversations"]
        assert (listed["id"], listed["title"]) == (found_id, f"Stripes {word}x")
        long_query = await client.get("/api/conversations", params={"q": "x" * 201})
        assert long_query.status_code == 422


async def test_deleting_closes_the_sockets_and_stops_the_reply(
    server: Addressed, fake: FakeUpstream
) -> None:
    fake.then(Behaviour(tokens=[" x"] * 2000, delay=0.005))
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("go on")
        await until_reply_text(ws)
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            deleted = await client.delete(f"/api/conversations/{conversation}")
        assert deleted.status_code == 204
        code, reason = await close_of(ws)
    assert code == 1008
    assert "deleted" in reason
    record = fake.requests[0]
    await fake.until(lambda: record.hung_up_at is not None, UNIT)


async def test_openapi_lists_the_conversation_routes(server: Addressed) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/api/conversations"]) == {"get", "post"}
    assert set(paths["/api/conversations/{conversation_id}"]) == {"get", "patch", "delete"}
    assert set(paths["/api/conversations/{conversation_id}/messages"]) == {"post"}


async def test_sse_joins_and_resumes_with_last_event_id(
    server: Addressed, fake: FakeUpstream
) -> None:
    words = [f" w{n}" for n in range(200)]
    fake.then(Behaviour(tokens=words, delay=0.005))
    async with connect(server.ws) as ws:
        conversation = conversation_of(ws)
        await ws.send("a story")
        await recv(ws)
    # The socket left; the reply goes on for whoever joins next.
    url = f"{server.http}/sse"
    received: list[Frame] = []
    last_id: str | None = None
    async with httpx.AsyncClient(timeout=UNIT * 5) as client:
        for drop in range(4):  # three drops, then read to the end
            headers = {"Last-Event-ID": last_id} if last_id else {}
            params = {"conversation": conversation}
            async with client.stream("GET", url, params=params, headers=headers) as response:
                assert response.status_code == 200
                count = 0
                async for event_id, frame in events(response):
                    if event_id is None:
                        assert frame["conversation"] == conversation  # the opening info
                        continue
                    assert int(event_id) == frame["seq"]
                    received.append(frame)
                    last_id = event_id
                    count += 1
                    if frame["type"] == "end" or (drop < 3 and count == 5):
                        break
    assert received[0]["sender"] == "you"
    assert text_of(received) == "".join(words)
    assert [f["seq"] for f in received] == sorted({f["seq"] for f in received})


async def test_sse_for_an_unknown_conversation_is_404(server: Addressed) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(f"{server.http}/sse", params={"conversation": "0" * 32})
    assert response.status_code == 404
    assert "No conversation" in response.json()["detail"]
