"""permessage-deflate as browsers offer it: negotiated without context takeover, so an open
socket keeps no zlib state, and only large messages are compressed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytest
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.frames import Frame
from websockets.typing import ExtensionParameter

from backend.process.protocols import DEFLATE_MIN_BYTES, WebSocketProtocol
from fakes.openai_server import FakeUpstream
from tests.harness import LiveServer, SettingsFactory, ask, connect, live_server, text_of

# What the server answers to an offer with `client_max_window_bits` (Chromium's, and the
# `websockets` client's), and to a bare `permessage-deflate` (Firefox's).
AGREED = (
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
    "server_max_window_bits=12"
)
OFFERS: dict[str, tuple[Literal[True] | None, str]] = {
    "chromium": (True, f"{AGREED}; client_max_window_bits=12"),
    "firefox": (None, AGREED),
}


class Recording(PerMessageDeflate):
    """The client's side of the extension, noting of every message it receives whether it
    came compressed, and its size once decompressed."""

    received: list[tuple[bool, int]]

    def decode(self, frame: Frame, *, max_size: int | None = None) -> Frame:
        decoded = super().decode(frame, max_size=max_size)
        self.received.append((frame.rsv1, len(decoded.data)))
        return decoded


class RecordingFactory(ClientPerMessageDeflateFactory):
    def __init__(self, client_max_window_bits: Literal[True] | None) -> None:
        super().__init__(
            client_max_window_bits=client_max_window_bits, compress_settings={"memLevel": 5}
        )
        self.extension: Recording | None = None

    def process_response_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> PerMessageDeflate:
        agreed = super().process_response_params(params, accepted_extensions)
        self.extension = Recording(
            agreed.remote_no_context_takeover,
            agreed.local_no_context_takeover,
            agreed.remote_max_window_bits,
            agreed.local_max_window_bits,
            agreed.compress_settings,
        )
        self.extension.received = []
        return self.extension


def server_extensions(server: LiveServer) -> list[Extension]:
    """The extensions of every WebSocket the server has open."""
    sockets = [
        protocol
        for protocol in server.server.server_state.connections
        if isinstance(protocol, WebSocketProtocol)
    ]
    assert sockets
    return [extension for socket in sockets for extension in socket.conn.extensions]


def holds_zlib_state(extension: Extension) -> bool:
    return hasattr(extension, "encoder") or hasattr(extension, "decoder")


@pytest.mark.parametrize("browser", OFFERS)
async def test_a_browser_offer_is_agreed_without_context_takeover(
    make_settings: SettingsFactory, fake: FakeUpstream, browser: str
) -> None:
    window_bits, agreed = OFFERS[browser]
    offer = RecordingFactory(window_bits)
    with live_server(make_settings()) as server:
        async with connect(server.ws, compression=None, extensions=[offer]) as ws:
            assert ws.response is not None
            assert ws.response.headers["Sec-WebSocket-Extensions"] == agreed
            [extension] = server_extensions(server)
            assert isinstance(extension, PerMessageDeflate)
            assert not holds_zlib_state(extension)


async def test_a_reply_streams_compressed_only_where_it_is_large(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    offer = RecordingFactory(True)
    # Said back whole (the echo), then answered a word at a time (the fake's echo reply).
    question = " ".join(f"word{n}" for n in range(400))
    with live_server(make_settings()) as server:
        async with connect(server.ws, compression=None, extensions=[offer]) as ws:
            frames = await ask(ws, question)
            # The client compressed the question; the server read it whole.
            assert frames[0]["sender"] == "you"
            assert frames[0]["message"] == question
            assert text_of(frames) == f"You said: {question}"
            assert frames[-1]["status"] == "completed"
            assert not any(holds_zlib_state(e) for e in server_extensions(server))
    assert offer.extension is not None
    received = offer.extension.received
    assert any(compressed for compressed, _ in received), received
    assert any(not compressed for compressed, _ in received), received
    for compressed, size in received:
        assert compressed == (size >= DEFLATE_MIN_BYTES), received


async def test_a_client_that_offers_no_compression_gets_none(
    make_settings: SettingsFactory, fake: FakeUpstream
) -> None:
    with live_server(make_settings()) as server:
        async with connect(server.ws, compression=None) as ws:
            assert ws.response is not None
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert (await ask(ws, "plain"))[-1]["status"] == "completed"
            assert server_extensions(server) == []
