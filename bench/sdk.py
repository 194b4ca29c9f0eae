"""The Vercel AI SDK's route against the WebSocket, on one server, in one run.

The same chat server answers both: `POST /api/chat` (the UI message stream, read as SSE lines
by a minimal HTTP client, as `DefaultChatTransport` reads them) and `/chat` (the WebSocket).
Time to first token is measured one question per route in turn, so each SDK sample sits next
to a socket sample taken under the same load; throughput (2,000 tokens, question to end) in
interleaved rounds. Each SDK question is a new chat, as each socket question is after a reset.
`python -m bench.sdk [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

from websockets.asyncio.client import ClientConnection, connect

from backend.process.server import free_port
from bench.run import (
    TOKEN,
    fake_model,
    frame,
    ms,
    process,
    server_env,
    wait_for_port,
)

STREAM_TOKENS = 2000
TURNS = 5


def chat_body(chat_id: str, question: str) -> dict[str, object]:
    return {
        "id": chat_id,
        "trigger": "submit-message",
        "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": question}]}],
    }


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client for one server: as little client-side cost per
    request as the WebSocket client has per message, so the routes are what is compared."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> HttpClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST `body`, then the response body's chunks (chunked transfer encoding)."""
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]


async def sdk_reply(client: HttpClient, chat_id: str, question: str) -> tuple[float, float, int]:
    """One question: seconds to the first text delta, seconds to `finish`, tokens received."""
    first, finished, text = await sdk_text(client, chat_id, question)
    return first, finished, text.count(TOKEN)


async def sdk_text(client: HttpClient, chat_id: str, question: str) -> tuple[float, float, str]:
    """One question: seconds to the first text delta, seconds to `finish`, the text."""
    sent = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    finished = 0.0
    pending = b""
    async for data in client.post_stream(
        "/api/chat", json.dumps(chat_body(chat_id, question)).encode()
    ):
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            chunk = json.loads(event[6:])
            if chunk["type"] == "text-delta":
                if not first:
                    first = time.perf_counter() - sent
                parts.append(chunk["delta"])
            elif chunk["type"] == "finish":
                finished = time.perf_counter() - sent
    if not finished:
        raise RuntimeError("the stream ended without `finish`")
    return first, finished, "".join(parts)


async def socket_reply(
    ws: ClientConnection, question: str, reset: bool = True
) -> tuple[float, float, int]:
    """The same over the socket, then a reset (a new conversation for the next one) if asked."""
    sent = time.perf_counter()
    await ws.send(question)
    first = 0.0
    tokens = 0
    while (got := await frame(ws))["type"] != "end":
        if got["type"] == "stream" and got["sender"] == "bot":
            if not first:
                first = time.perf_counter() - sent
            tokens += got["message"].count(TOKEN)
    elapsed = time.perf_counter() - sent
    if reset:
        await ws.send(json.dumps({"type": "reset"}))
        await ws.recv()
    return first, elapsed, tokens


def new_chat() -> str:
    return uuid.uuid4().hex[:16]


async def measure(port: int, quick: bool) -> None:
    chats, rounds = (15, 3) if quick else (80, 7)
    async with (
        HttpClient(port) as client,
        connect(f"ws://127.0.0.1:{port}/chat", compression=None, max_size=None) as ws,
    ):
        await ws.recv()  # the conversation it opens in
        for _ in range(10):  # warm both
            await sdk_reply(client, new_chat(), "bench tokens=3")
            await socket_reply(ws, "bench tokens=3")
        # Conversations of TURNS questions each, the two routes in turn, question by question.
        first: dict[str, list[float]] = {"ws": [], "sdk": []}
        later: dict[str, list[float]] = {"ws": [], "sdk": []}
        for _ in range(chats):
            chat = new_chat()
            for turn in range(TURNS):
                last = turn == TURNS - 1
                into = first if turn == 0 else later
                into["ws"].append((await socket_reply(ws, "bench tokens=3", reset=last))[0])
                into["sdk"].append((await sdk_reply(client, chat, "bench tokens=3"))[0])
                await asyncio.sleep(0.005)
        rate: dict[str, list[float]] = {"ws": [], "sdk": []}
        question = f"bench tokens={STREAM_TOKENS}"
        for _ in range(rounds):
            _, elapsed, got = await socket_reply(ws, question)
            assert got == STREAM_TOKENS, f"the socket got {got} tokens"
            rate["ws"].append(STREAM_TOKENS / elapsed)
            _, elapsed, got = await sdk_reply(client, new_chat(), question)
            assert got == STREAM_TOKENS, f"the SDK route got {got} tokens"
            rate["sdk"].append(STREAM_TOKENS / elapsed)
    for label, times in (("a conversation's next questions", later), ("its first", first)):
        sdk, ws_ = statistics.median(times["sdk"]), statistics.median(times["ws"])
        paired = statistics.median(s - w for s, w in zip(times["sdk"], times["ws"], strict=True))
        target = " (target <= 1.10)" if times is later else ""
        print(
            f"time to first token p50, {label} ({len(times['ws'])} each): WebSocket {ms(ws_)}, "
            f"AI SDK route {ms(sdk)}, ratio {sdk / ws_:.2f}{target}; median of paired "
            f"differences {paired * 1000:+.2f} ms"
        )
    sdk_tps, ws_tps = statistics.median(rate["sdk"]), statistics.median(rate["ws"])
    print(
        f"throughput, {STREAM_TOKENS} tokens, median of {rounds}: WebSocket {ws_tps:,.0f} tok/s, "
        f"AI SDK route {sdk_tps:,.0f} tok/s, ratio {sdk_tps / ws_tps:.2f} (target >= 0.90)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data, fake_model() as upstream:
        port = free_port()
        env = server_env(upstream, CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{data}/chat.db")
        with process(["-m", "backend", "--port", str(port)], env):
            wait_for_port(port)
            asyncio.run(measure(port, args.quick))


if __name__ == "__main__":
    main()
