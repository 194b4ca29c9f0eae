"""uvicorn's HTTP (httptools) and WebSocket (websockets, sans I/O) protocols, with the answers
they owe requests that are too big or not HTTP at all (a 4xx with a sentence, then a close),
and an open WebSocket's memory kept small, compression offered or not."""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Sequence
from typing import Any

import httptools
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import CONT, CTRL_OPCODES, Frame
from websockets.http11 import Request
from websockets.typing import ExtensionParameter

from backend.chat.gate import Gate
from backend.observe.logs import Throttled

# httptools' own limit: it cannot parse a longer URL. A long question (`GET /stream?prompt=`
# percent-encodes each character in up to nine bytes) goes in a body or over the socket.
MAX_URL_BYTES = 65_535
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
# The AI SDK's transport posts the whole chat with every question.
MAX_BODY_BYTES = 16 * 1024 * 1024

# Seconds a refused client may go on sending (its bytes are dropped) before it is cut off.
LINGER = 2.0
# Anyone can send what these refuse, as often as they like: a line once in a while is enough.
refusals = Throttled(logging.getLogger(__name__))


def plain_response(status: int, sentence: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, its body one sentence."""
    body = f"{sentence}\n".encode()
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class Refused(Exception):
    """A request the server answers itself, before any app sees it."""

    def __init__(self, status: int, sentence: str, answered: bool = False) -> None:
        super().__init__(sentence)
        self.response = b"" if answered else plain_response(status, sentence)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on a request's URL, headers and body.

    httptools has none of its own: a client could send megabytes of headers, all kept in
    memory, and get a 200 for them. Nor has uvicorn a limit on how long a request may take to
    arrive: a client that opens connections and never finishes a request would hold each
    forever. Here a request may go `request_idle` seconds without a byte, then gets a 408.
    """

    request_idle = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.header_bytes = 0
        self.body_bytes = 0
        self.lingering = False
        # A request has begun (or is awaited on a new connection) and is not complete.
        self.unfinished = True
        self.idle_timer: asyncio.TimerHandle | None = None
        self._watch_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.unfinished = False
        self._watch_idle()
        super().connection_lost(exc)

    def _watch_idle(self) -> None:
        """(Re)start the wait for the unfinished request's next byte; stop it once finished."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.unfinished:
            self.idle_timer = self.loop.call_later(self.request_idle, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if self.transport.is_closing():
            return
        refusals.log(logging.INFO, "stalled", "closed a connection whose request stalled")
        if self.cycle is None or not self.cycle.response_started:
            seconds = f"{self.request_idle:g}"
            self.transport.write(plain_response(408, f"The request stalled for {seconds} s."))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = 0
        self.body_bytes = 0
        self.unfinished = True

    def on_message_complete(self) -> None:
        self.unfinished = False
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self.unfinished = False
        self._watch_idle()
        super().handle_websocket_upgrade()
        # The WebSocket protocol has the connection now. This one and its parser refer to
        # each other: left as they are, they wait for the cyclic collector, the request's
        # URL, scope and headers with them. (uvicorn lets go of it the same way once the
        # connection is lost.)
        self.parser = None  # type: ignore[assignment]

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL_BYTES:
            raise Refused(
                414,
                "The URL is longer than 64 KB; send a long question in a body "
                "(POST /api/chat) or over the WebSocket.",
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES or len(self.headers) >= MAX_HEADERS:
            raise Refused(
                431,
                f"The headers are over {MAX_HEADER_BYTES // 1024} KB or {MAX_HEADERS} fields.",
            )
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                raise Refused(413, too_large())
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            if self.cycle is not None and self.cycle.response_started:
                # The app answered without reading the body: no second answer, just the end.
                raise Refused(413, too_large(), answered=True)
            raise Refused(413, too_large())
        super().on_body(body)

    def _answer_and_linger(self, response: bytes) -> None:
        """Send `response`, then read and drop what the client is still sending for a moment
        before closing: closing at once, with its bytes unread, would reset the connection and
        could destroy the response before the client reads it."""
        self.lingering = True
        self.unfinished = False
        self._watch_idle()
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        # uvicorn's own, but a refusal of ours is answered with its status and sentence, and
        # what httptools cannot parse is no warning: anyone can send it, as often as they like.
        self._unset_keepalive_if_required()
        # A new request's first bytes: `on_message_begin` marks it unfinished as they are read.
        try:
            self.parser.feed_data(data)
            self._watch_idle()
        except httptools.HttpParserCallbackError as error:
            refused = error.__context__
            if not isinstance(refused, Refused):
                # httptools' own refusals raised in our callbacks (a URL it cannot parse).
                self.send_400_response("Invalid HTTP request received.")
                return
            refusals.log(logging.INFO, "too large", "refused a request: %s", refused)
            self._answer_and_linger(refused.response)
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()


def http_protocol(request_idle: float) -> type[HttpProtocol]:
    """`HttpProtocol` waiting `request_idle` seconds for a request's next byte."""
    return type("HttpProtocol", (HttpProtocol,), {"request_idle": request_idle})


def too_large() -> str:
    return f"The body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB."


# websockets' own lines ("connection open", "connection rejected") repeat uvicorn's.
logging.getLogger(f"{__name__}.websockets").setLevel(logging.WARNING)

# A message this long or longer is compressed, when the client offered permessage-deflate: a
# replayed history, a long question said back. A token's frame (under 100 bytes) would shrink
# by a few bytes at most, for microseconds of CPU each (docs/benchmarks.md, "Memory per idle
# socket, as browsers connect").
DEFLATE_MIN_BYTES = 1024
# The LZ77 window and zlib's memLevel while a message is compressed, websockets' and uvicorn's
# defaults: 38 KB for the time of one message, where zlib's own take 262 KB.
DEFLATE_WINDOW_BITS = 12
DEFLATE_MEM_LEVEL = 5


class LargeMessageDeflate(PerMessageDeflate):
    """permessage-deflate without context takeover, compressing large messages only.

    Without context takeover neither side keeps zlib state between messages: a compressor or
    decompressor lives for one message. With it (uvicorn's choice), every socket holds both
    for as long as it is open, 36 KiB, idle or not. Messages under `min_size` bytes are sent
    as they are, which the extension allows (their RSV1 bit is clear).
    """

    def __init__(self, *args: Any, min_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_size = min_size
        self.compressing = False

    def encode(self, frame: Frame) -> Frame:
        if frame.opcode in CTRL_OPCODES:
            return frame
        if frame.opcode is not CONT:
            self.compressing = len(frame.data) >= self.min_size
        compress = self.compressing
        if frame.fin:
            self.compressing = False
        return super().encode(frame) if compress else frame


class LargeMessageDeflateFactory(ServerPerMessageDeflateFactory):
    """Accepts a client's permessage-deflate offer as `LargeMessageDeflate`."""

    def __init__(self, min_size: int) -> None:
        super().__init__(
            server_no_context_takeover=True,
            client_no_context_takeover=True,
            server_max_window_bits=DEFLATE_WINDOW_BITS,
            client_max_window_bits=DEFLATE_WINDOW_BITS,
            compress_settings={"memLevel": DEFLATE_MEM_LEVEL},
        )
        self.min_size = min_size

    def process_request_params(
        self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension]
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, agreed = super().process_request_params(params, accepted_extensions)
        return response, LargeMessageDeflate(
            agreed.remote_no_context_takeover,
            agreed.local_no_context_takeover,
            agreed.remote_max_window_bits,
            agreed.local_max_window_bits,
            agreed.compress_settings,
            min_size=self.min_size,
        )


# Shared by every socket: a factory keeps no state of its own.
EXTENSIONS = (LargeMessageDeflateFactory(DEFLATE_MIN_BYTES),)


class Inbox:
    """What uvicorn asks of the `asyncio.Queue` of a socket's received events (`put_nowait`,
    `get`, `empty`), kept in a list: the queue's three deques and Event cost 3 KB a socket."""

    __slots__ = ("items", "waiters")

    def __init__(self) -> None:
        self.items: list[ASGIReceiveEvent] = []
        self.waiters: list[asyncio.Future[None]] = []

    def empty(self) -> bool:
        return not self.items

    def put_nowait(self, item: ASGIReceiveEvent) -> None:
        self.items.append(item)
        if self.waiters:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def get(self) -> ASGIReceiveEvent:
        while not self.items:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
        return self.items.pop(0)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, finishing the handshakes it leaves hanging, and
    holding less memory per open socket.

    websockets parses the handshake before the app sees it, and refuses a request line or a
    header over its limits (414, 431) or a request that is not HTTP; uvicorn writes out only
    what websockets produced for a handshake that parsed, so these refusals were never sent and
    the connection stayed open, holding its memory and descriptor. And a handshake the app
    refused with an HTTP response (403, 401, 429) was logged as an error of the app.

    An idle socket opened the way browsers open one (offering permessage-deflate) cost 77 KiB
    of uvicorn's: it negotiates compression with context takeover (a zlib compressor and
    decompressor kept per socket, 36 KiB), keeps the handshake's request and response headers
    for as long as the socket is open, and an asyncio queue and event, four deques of 760 bytes
    between them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.logger = logging.getLogger(f"{__name__}.websockets")
        if self.config.ws_per_message_deflate:
            self.conn.available_extensions = EXTENSIONS
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Gate(open=True)  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The scope has its own copy of the headers, and the 101 response is ready: websockets'
        # parser keeps the request for as long as the socket is open, the headers need not.
        event.headers.clear()

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # Sent; nothing reads it again.
            self.response.headers.clear()
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.handshake_initiated or self.conn.handshake_exc is None:
            return
        answer = b"".join(self.conn.data_to_send()) or NOT_HTTP
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(answer)
        self.transport.close()


NOT_HTTP = plain_response(400, "Failed to open a WebSocket connection: the request is not HTTP.")
