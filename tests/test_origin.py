"""Cross-site WebSocket hijacking: browser handshakes from foreign origins are refused."""

from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from backend.web.origin import origin_allowed
from deploy.services import Addressed
from fakes.openai_server import FakeUpstream
from tests.harness import (
    UNIT,
    UPGRADE,
    SettingsFactory,
    ask,
    connect,
    conversation_of,
    live_server,
    raw_exchange,
    status_of,
)


async def test_foreign_origin_is_refused_with_403(server: Addressed, fake: FakeUpstream) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    assert b"CHAT_ALLOWED_ORIGINS" in refused.value.response.body


async def test_same_origin_and_no_origin_are_accepted(
    server: Addressed, fake: FakeUpstream
) -> None:
    async with connect(server.ws, origin=server.http) as ws:
        assert (await ask(ws, "from the page"))[-1]["status"] == "completed"
    async with connect(server.ws) as ws:
        assert (await ask(ws, "from a script"))[-1]["status"] == "completed"


async def test_allowed_origins_setting_adds_origins(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(chat_allowed_origins="https://app.example, http://localhost:5173")
    with live_server(settings) as server:
        async with connect(server.ws, origin="https://app.example") as ws:
            assert (await ask(ws, "hi"))[-1]["status"] == "completed"
        with pytest.raises(InvalidStatus):
            async with connect(server.ws, origin="https://other.example"):
                pass


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "chat.example", True),
        ("https://chat.example", "chat.example", True),
        ("https://chat.example", "chat.example:443", True),
        ("http://chat.example:8000", "chat.example:8000", True),
        ("HTTP://Chat.Example:8000", "chat.example:8000", True),
        ("http://chat.example:8001", "chat.example:8000", False),
        ("https://chat.example.evil.net", "chat.example", False),
        ("null", "chat.example", False),
        ("file://", "chat.example", False),
        ("http://[::1]:8000", "[::1]:8000", True),
    ],
)
def test_origin_rules(origin: str | None, host: str, allowed: bool) -> None:
    assert origin_allowed(origin, host, []) is allowed


@pytest.mark.parametrize("path", ["/stream", "/sse"])
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"origin": "https://evil.example"}, 403),
        ({"sec-fetch-site": "cross-site"}, 403),
        ({"sec-fetch-site": "same-origin"}, 200),
        ({"sec-fetch-site": "none"}, 200),
    ],
)
async def test_http_streams_refuse_cross_site_requests(
    server: Addressed, fake: FakeUpstream, path: str, headers: dict[str, str], status: int
) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(
            f"{server.http}{path}", params={"prompt": "hi"}, headers=headers
        )
    assert response.status_code == status
    if status == 403:
        assert "CHAT_ALLOWED_ORIGINS" in response.json()["detail"]
        assert fake.requests == []


@pytest.mark.parametrize(
    "headers", [{"origin": "http://evil.example"}, {"sec-fetch-site": "cross-site"}]
)
async def test_every_route_on_conversations_refuses_another_sites_page(
    server: Addressed, fake: FakeUpstream, headers: dict[str, str]
) -> None:
    async with connect(server.ws) as ws:
        await ask(ws, "mine")
        conversation = conversation_of(ws)
    routes = [
        ("GET", "/api/conversations"),
        ("GET", f"/api/conversations/{conversation}"),
        ("DELETE", f"/api/conversations/{conversation}"),
        ("PATCH", f"/api/conversations/{conversation}"),
        ("POST", "/api/ws-ticket"),
        ("GET", f"/api/chat/{conversation}"),
        ("GET", f"/api/chat/{conversation}/stream"),
        ("POST", f"/api/chat/{conversation}/stop"),
        ("GET", f"/sse?conversation={conversation}"),
        ("GET", "/stream?prompt=hi"),
    ]
    async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
        for method, path in routes:
            response = await client.request(method, path, headers=headers)
            assert response.status_code == 403, (method, path, response.text)
            # JSON's `detail`, or the /api/chat routes' plain sentence.
            assert "CHAT_ALLOWED_ORIGINS" in response.text
        # Nothing was done in the visitor's name: the conversation is still there, whole.
        kept = await client.get(f"/api/conversations/{conversation}")
        assert kept.status_code == 200
        assert kept.json()["messages"][0]["text"] == "mine"
    assert len(fake.requests) == 1


async def test_http_stream_accepts_its_own_page(server: Addressed, fake: FakeUpstream) -> None:
    async with httpx.AsyncClient(timeout=UNIT) as client:
        response = await client.get(
            f"{server.http}/sse", params={"prompt": "hi"}, headers={"origin": server.http}
        )
    assert response.status_code == 200


async def test_without_sign_in_only_this_machines_names_are_served(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    # A page on evil.example re-points its own name at 127.0.0.1 (DNS rebinding): its
    # requests then carry that name as Host, and an Origin that matches it.
    with live_server(make_settings()) as server:
        rebound = f"evil.example:{server.port}"
        headers = {"Host": rebound, "Origin": f"http://{rebound}"}
        async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
            refused = await client.get("/api/conversations", headers=headers)
            assert refused.status_code == 403
            assert "this machine's names only" in refused.json()["detail"]
            assert (await client.get("/stream?prompt=hi", headers=headers)).status_code == 403
            for name in ("localhost", "127.0.0.1", "[::1]"):
                own = {"Host": f"{name}:{server.port}", "Origin": f"http://{name}:{server.port}"}
                assert (await client.get("/api/conversations", headers=own)).status_code == 200
        handshake = (
            f"GET /chat HTTP/1.1\r\nHost: {rebound}\r\nOrigin: http://{rebound}\r\n{UPGRADE}\r\n"
        )
        answer = await raw_exchange(server.port, handshake.encode())
        assert status_of(answer) == 403
    assert fake.requests == []
    # Signed-in users, or a port something else guards, may be reached by any name.
    for guarded in (
        make_settings(chat_allow_anonymous=True),
        make_settings(chat_allowed_origins="http://evil.example"),
    ):
        with live_server(guarded) as server:
            rebound = f"evil.example:{server.port}"
            async with httpx.AsyncClient(base_url=server.http, timeout=UNIT) as client:
                served = await client.get(
                    "/api/conversations", headers={"Host": rebound, "Origin": f"http://{rebound}"}
                )
                assert served.status_code == 200, served.text
