"""uvicorn's HTTP (httptools) and WebSocket (websockets, sans I/O) protocols, with the answers
they owe requests that are too big or not HTTP at all: a 4xx with a sentence, then a close."""

from __future__ import annotations

import http

import httptools
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# `GET /stream?prompt=` carries a question of up to 16,000 characters, percent-encoded (up to
# nine bytes each); deploy/nginx.conf takes the same.
MAX_URL_BYTES = 160 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 128
# The AI SDK's transport posts the whole chat with every question.
MAX_BODY_BYTES = 16 * 1024 * 1024


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

    def __init__(self, status: int, sentence: str) -> None:
        super().__init__(sentence)
        self.response = plain_response(status, sentence)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on a request's URL, headers and body.

    httptools has none of its own: a client could send megabytes of headers, all kept in
    memory, and get a 200 for them.
    """

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_bytes = 0
        self.body_bytes = 0

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL_BYTES:
            raise Refused(414, f"The URL is longer than {MAX_URL_BYTES // 1024} KB.")
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
            raise Refused(413, too_large())
        super().on_body(body)

    def data_received(self, data: bytes) -> None:
        # uvicorn's own, but a refusal of ours is answered with its status and sentence, and
        # what httptools cannot parse is no warning: anyone can send it, as often as they like.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as error:
            refused = error.__context__
            if not isinstance(refused, Refused):
                raise
            self.logger.info("refused a request: %s", refused)
            self.transport.write(refused.response)
            self.transport.close()
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()


def too_large() -> str:
    return f"The body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MB."


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, finishing the handshakes it leaves hanging.

    websockets parses the handshake before the app sees it, and refuses a request line or a
    header over its limits (414, 431) or a request that is not HTTP; uvicorn writes out only
    what websockets produced for a handshake that parsed, so these refusals were never sent and
    the connection stayed open, holding its memory and descriptor. And a handshake the app
    refused with an HTTP response (403, 401, 429) was logged as an error of the app.
    """

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
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
