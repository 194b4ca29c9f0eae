"""Cross-site WebSocket hijacking: browser handshakes from foreign origins are refused."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from backend.origin import origin_allowed
from tests.fake_upstream import FakeUpstream
from tests.harness import LiveServer, SettingsFactory, ask, live_server


async def test_foreign_origin_is_refused_with_403(server: LiveServer, fake: FakeUpstream) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(server.ws, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    assert b"CHAT_ALLOWED_ORIGINS" in refused.value.response.body


async def test_same_origin_and_no_origin_are_accepted(
    server: LiveServer, fake: FakeUpstream
) -> None:
    async with connect(server.ws, origin=server.http) as ws:  # type: ignore[arg-type]
        assert (await ask(ws, "from the page"))[-1]["status"] == "completed"
    async with connect(server.ws) as ws:
        assert (await ask(ws, "from a script"))[-1]["status"] == "completed"


async def test_allowed_origins_setting_adds_origins(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    settings = make_settings(chat_allowed_origins="https://app.example, http://localhost:5173")
    with live_server(settings) as server:
        async with connect(server.ws, origin="https://app.example") as ws:  # type: ignore[arg-type]
            assert (await ask(ws, "hi"))[-1]["status"] == "completed"
        with pytest.raises(InvalidStatus):
            async with connect(server.ws, origin="https://other.example"):  # type: ignore[arg-type]
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
