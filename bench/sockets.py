"""Memory per idle socket as browsers open them, and what per-message deflate costs and saves.

Browsers offer permessage-deflate on every WebSocket, and so does the `websockets` client by
default. Every measurement below is taken on a fresh server process (`python -m backend`,
single process, a SQLite file in a temporary folder, a fake model) with the client offering
compression and with it not offering any:

- **idle sockets**: the server's resident memory before and after N sockets are opened (the
  opening `info` frame read on each, then nothing), divided by N; N = 500 and 2,000.
- **streaming**: S sockets at once each receive a reply of T prose tokens at 100 tokens/s:
  the server's CPU time (`/proc/PID/stat`) per token. Then one socket alone (a frame per
  token, none merged behind a busy writer): the bytes its client received on its TCP
  connection per token, frames and their headers.
- **history replay**: a conversation of 50 turns (a few hundred tokens of prose each) joined
  again: bytes received on the TCP connection until the 50th `end`, and the server's CPU per
  replay.
- **deflate by message size** (in this process): what a fresh compressor, with the server's
  window and memLevel, makes of a `stream` frame of a given size, and in how long.

The model is a fake answering with prose (words of Python's own documentation, so replies
compress as text does), in a process of its own. `--before CHECKOUT` measures another
checkout's server in the same run (the machines are shared and noisy: compare within a run).

`python -m bench.sockets [--quick] [--before CHECKOUT]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, cast

from websockets.asyncio.client import ClientConnection, connect

from backend.process.protocols import DEFLATE_MEM_LEVEL, DEFLATE_WINDOW_BITS
from backend.process.server import free_port
from bench.load import rss_bytes
from bench.run import cpu_seconds, frame, process, server_env, wait_for_port
from fakes.openai_server import Behaviour, FakeUpstream

# How a browser opens a socket, and how `bench/load.py` does.
OFFERS: dict[str, str | None] = {"deflate offered": "deflate", "not offered": None}
TOKEN_DELAY = 0.01  # 100 tokens/s
TURNS = 50
TURN_TOKENS = 300


@cache
def prose() -> list[str]:
    """Words of Python's documentation, in order: text that compresses as replies do."""
    from pydoc_data.topics import topics

    return " ".join(topics[name] for name in sorted(topics)).split()


def prose_reply(body: dict[str, Any]) -> Behaviour | None:
    """The fake model's answer to `prose tokens=N from=I [delay=S]`: N words of prose from
    the I-th on, one token each."""
    asked = [m for m in body.get("messages", []) if m.get("role") == "user"] or [{}]
    words = str(asked[-1].get("content", "")).split()
    if not words or words[0] != "prose":
        return None
    options = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    return Behaviour(
        tokens=reply_tokens(int(options.get("tokens", "100")), int(options.get("from", "0"))),
        delay=float(options.get("delay", "0")),
    )


def reply_tokens(count: int, start: int) -> list[str]:
    words = prose()
    return [f" {words[(start + n) % len(words)]}" for n in range(count)]


def serve_prose_model() -> None:
    """Run the fake model answering with prose; its base URL on the first line of stdout."""
    fake = FakeUpstream()
    fake.chooser = prose_reply
    fake.start()
    print(fake.url, flush=True)
    threading.Event().wait()


@contextmanager
def prose_model() -> Iterator[str]:
    with process(["-m", "bench.sockets", "--prose-model"]) as fake:
        assert fake.stdout is not None
        yield fake.stdout.readline().strip()


class CountingConnection(ClientConnection):
    """A client connection that counts the bytes it receives on its TCP connection."""

    received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        super().data_received(data)


@dataclass(frozen=True)
class Checkout:
    """A server to measure: this checkout's (`folder` None) or another one's."""

    name: str
    folder: str | None = None


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextmanager
def fresh_server(checkout: Checkout, upstream: str, data: str) -> Iterator[Server]:
    """A new `python -m backend` of `checkout`, with a database of its own."""
    port = free_port()
    database = f"sqlite+aiosqlite:///{data}/{uuid.uuid4().hex}.db"
    env = server_env(upstream, CHAT_DATABASE_URL=database)
    args = ["-m", "backend", "--port", str(port)]
    with process(args, env, cwd=checkout.folder) as proc:
        wait_for_port(port)
        time.sleep(1.0)  # let it settle before its memory is read
        yield Server(f"ws://127.0.0.1:{port}/chat", proc.pid)


async def idle_memory(server: Server, count: int, compression: str | None) -> float:
    """Bytes of resident memory per open, idle socket opened with `compression`."""
    before = rss_bytes(server.pid)
    async with contextlib.AsyncExitStack() as stack:

        async def one() -> None:
            ws = await stack.enter_async_context(
                connect(server.url, compression=compression, open_timeout=60)
            )
            hello = await frame(ws)
            assert hello["type"] == "info", hello

        for opened in range(0, count, 100):
            await asyncio.gather(*(one() for _ in range(min(100, count - opened))))
        await asyncio.sleep(1.0)
        after = rss_bytes(server.pid)
    return (after - before) / count


@dataclass
class Streamed:
    tokens: int = 0
    frames: int = 0
    wire_bytes: int = 0
    failures: int = 0
    cpu: float = 0.0


async def stream_replies(
    server: Server, sockets: int, tokens: int, compression: str | None, start: int
) -> Streamed:
    """`sockets` clients at once each receive a paced prose reply of `tokens` tokens."""
    result = Streamed()

    async def one(n: int) -> None:
        async with connect(
            server.url,
            compression=compression,
            open_timeout=60,
            max_size=None,
            create_connection=CountingConnection,
        ) as ws:
            counted = cast(CountingConnection, ws)
            await frame(ws)
            offset = start + n * tokens
            received = counted.received
            await ws.send(f"prose tokens={tokens} from={offset} delay={TOKEN_DELAY}")
            text = []
            while True:
                got = await asyncio.wait_for(frame(ws), 60)
                if got["type"] == "stream" and got["sender"] == "bot":
                    text.append(got["message"])
                elif got["type"] == "end":
                    break
            result.frames += len(text)
            result.wire_bytes += counted.received - received
            expected = "".join(reply_tokens(tokens, offset))
            if "".join(text) != expected or got["status"] != "completed":
                result.failures += 1
            result.tokens += tokens

    before = cpu_seconds(server.pid)
    await asyncio.gather(*(one(n) for n in range(sockets)))
    result.cpu = cpu_seconds(server.pid) - before
    return result


async def build_conversation(server: Server, turns: int, tokens: int) -> str:
    """A conversation of `turns` prose replies; its id."""
    async with connect(server.url, compression=None, max_size=None) as ws:
        conversation = str((await frame(ws))["conversation"])
        for turn in range(turns):
            await ws.send(f"prose tokens={tokens} from={turn * tokens}")
            while (await frame(ws))["type"] != "end":
                pass
    return conversation


async def replay(server: Server, conversation: str, turns: int, compression: str | None) -> int:
    """Bytes received on the TCP connection, handshake included, until the history's last
    `end`."""
    async with connect(
        f"{server.url}?conversation={conversation}",
        compression=compression,
        max_size=None,
        create_connection=CountingConnection,
    ) as ws:
        ends = 0
        while ends < turns:
            if (await asyncio.wait_for(frame(ws), 30))["type"] == "end":
                ends += 1
        return cast(CountingConnection, ws).received


@dataclass
class Results:
    """Per checkout and offer: each measure's values."""

    idle: dict[tuple[str, int, str], float] = field(default_factory=dict)
    cpu_per_token: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    bytes_per_token: dict[tuple[str, str], float] = field(default_factory=dict)
    replay_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    replay_cpu: dict[tuple[str, str], float] = field(default_factory=dict)


def kib(value: float) -> str:
    return f"{value / 1024:.1f} KiB"


def measure_idle(
    checkouts: list[Checkout], counts: tuple[int, ...], upstream: str, data: str, out: Results
) -> None:
    for count in counts:
        for checkout in checkouts:
            for offer, compression in OFFERS.items():
                with fresh_server(checkout, upstream, data) as server:
                    per = asyncio.run(idle_memory(server, count, compression))
                out.idle[checkout.name, count, offer] = per
                print(f"idle sockets, {checkout.name}, {count}, {offer}: {kib(per)} per socket")


async def measure_traffic(checkout: Checkout, server: Server, quick: bool, out: Results) -> None:
    sockets, tokens, rounds = (20, 200, 2) if quick else (50, TURN_TOKENS, 4)
    await stream_replies(server, 10, 50, None, 0)  # warm up
    failures = dict.fromkeys(OFFERS, 0)
    for round_ in range(rounds):
        offers = list(OFFERS.items())
        for offer, compression in offers if round_ % 2 == 0 else offers[::-1]:
            got = await stream_replies(server, sockets, tokens, compression, round_ * 100_000)
            failures[offer] += got.failures
            out.cpu_per_token.setdefault((checkout.name, offer), []).append(got.cpu / got.tokens)
    for offer, compression in OFFERS.items():
        cpu = statistics.median(out.cpu_per_token[checkout.name, offer])
        alone = await stream_replies(server, 1, TURN_TOKENS, compression, 900_000)
        out.bytes_per_token[checkout.name, offer] = alone.wire_bytes / alone.tokens
        print(
            f"streaming, {checkout.name}, {offer}: {sockets} sockets x {tokens} tokens, median "
            f"of {rounds}: server CPU {cpu * 1e6:.0f} µs per token; one socket alone: "
            f"{alone.wire_bytes / alone.tokens:.1f} bytes per token on the wire "
            f"({alone.tokens / alone.frames:.2f} tokens a frame); replies wrong or failed "
            f"{failures[offer] + alone.failures}"
        )

    turns = TURNS
    conversation = await build_conversation(server, turns, TURN_TOKENS)
    replays = 15 if quick else 30
    for offer, compression in OFFERS.items():
        await replay(server, conversation, turns, compression)  # load it, warm up
        before = cpu_seconds(server.pid)
        sizes = [await replay(server, conversation, turns, compression) for _ in range(replays)]
        cpu = (cpu_seconds(server.pid) - before) / replays
        out.replay_bytes[checkout.name, offer] = sizes[-1]
        out.replay_cpu[checkout.name, offer] = cpu
        print(
            f"history replay, {checkout.name}, {offer}: {turns} turns of {TURN_TOKENS} tokens, "
            f"{sizes[-1]:,} bytes received, server CPU {cpu * 1e3:.1f} ms per replay"
        )


def stream_frame(size: int, start: int) -> bytes:
    """A bot `stream` frame of prose, `size` bytes or a little more."""
    words = prose()
    text = ""
    while True:
        data = json.dumps(
            {"type": "stream", "sender": "bot", "message": text, "seq": 123456},
            separators=(",", ":"),
        ).encode()
        if len(data) >= size:
            return data
        text += f" {words[start % len(words)]}"
        start += 1


def deflate_by_size(quick: bool) -> None:
    """A fresh compressor per message, as the server compresses one: ratio and time."""
    count = 100 if quick else 400
    print(
        f"deflate by message size (window {DEFLATE_WINDOW_BITS} bits, memLevel "
        f"{DEFLATE_MEM_LEVEL}, a compressor per message):"
    )
    for size in (100, 300, 1024, 4096, 16384):
        messages = [stream_frame(size, 7919 * n) for n in range(count)]
        times = []
        for _ in range(5):  # the fastest of five: the least disturbed by the machine's others
            started = time.perf_counter()
            compressed = 0
            for message in messages:
                encoder = zlib.compressobj(wbits=-DEFLATE_WINDOW_BITS, memLevel=DEFLATE_MEM_LEVEL)
                compressed += len(encoder.compress(message) + encoder.flush(zlib.Z_SYNC_FLUSH)) - 4
            times.append((time.perf_counter() - started) / count)
        elapsed = min(times)
        ratio = compressed / sum(map(len, messages))
        print(f"  {size:>6,} bytes: {ratio:.2f} of the size, {elapsed * 1e6:.0f} µs a message")


def summary(checkouts: list[Checkout], counts: tuple[int, ...], out: Results) -> None:
    """The results as a Markdown table, a column per checkout and offer."""
    columns = [(c.name, offer) for c in checkouts for offer in OFFERS]
    print()
    print("| measure | " + " | ".join(f"{name}, {offer}" for name, offer in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for count in counts:
        cells = [kib(out.idle[name, count, offer]) for name, offer in columns]
        print(f"| idle socket, {count:,} sockets | " + " | ".join(cells) + " |")
    rows = {
        "server CPU per token": [
            f"{statistics.median(out.cpu_per_token[key]) * 1e6:.0f} µs" for key in columns
        ],
        "bytes per token on the wire": [f"{out.bytes_per_token[key]:.1f}" for key in columns],
        f"history replay ({TURNS} turns), bytes": [f"{out.replay_bytes[key]:,}" for key in columns],
        "history replay, server CPU": [f"{out.replay_cpu[key] * 1e3:.1f} ms" for key in columns],
    }
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def raise_open_files(needed: int) -> None:
    """Let this process (and the servers it starts) hold `needed` descriptors, if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 idle sockets, fewer rounds")
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="also measure the server of this checkout"
    )
    parser.add_argument("--prose-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prose_model:
        serve_prose_model()
        return
    counts = (500,) if args.quick else (500, 2000)
    raise_open_files(max(counts) * 2 + 1024)
    checkouts = ([Checkout("before", args.before)] if args.before else []) + [Checkout("now")]
    out = Results()
    deflate_by_size(args.quick)
    with tempfile.TemporaryDirectory() as data, prose_model() as upstream:
        measure_idle(checkouts, counts, upstream, data, out)
        for checkout in checkouts:
            with fresh_server(checkout, upstream, data) as server:
                asyncio.run(measure_traffic(checkout, server, args.quick, out))
    summary(checkouts, counts, out)


if __name__ == "__main__":
    main()
