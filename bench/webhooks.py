"""Webhooks: how soon a reply's end reaches a receiver, and whether deliveries slow replies.

Starts the fake model and the chat server (`python -m backend`, SQLite, one worker) with two
endpoints on receivers in this process: `fast`, which answers at once, and `slow`, which holds
every call for a minute. Then:

- **end → arrival**: N background questions (`POST /api/conversations`, naming `fast`), 50 a
  second, then N more all at once; for each delivery, its arrival at the receiver minus the
  event's own `timestamp` (when the reply ended, on the same clock), p50 and p99.
- **token latency with deliveries in flight**: paced socket replies whose tokens the fake stamps
  (the latency each token adds is its arrival minus that stamp, as in `bench/load.py`), first
  with no delivery in flight, then with 100 held by the slow receiver (100 background replies
  naming `slow`, `CHAT_WEBHOOK_CONCURRENCY=100`), in the same run.

`python -m bench.webhooks [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from datetime import datetime

import httpx

from backend.process.server import free_port
from bench.load import stamped_streams
from bench.run import fake_model, ms, percentile, process, server_env, wait_for_port

SECRET = "whsec_" + base64.b64encode(b"bench" * 7).decode()
HELD = 60.0  # seconds the slow receiver holds each call
IN_FLIGHT = 100
RATE = 50.0  # background questions a second, for the paced end -> arrival figure
BURST = 5000.0  # as fast as they can be sent


class Receiver:
    """An HTTP receiver on a loopback port: records each call's arrival, answers 204, after
    `hold` seconds."""

    def __init__(self, hold: float = 0.0) -> None:
        self.hold = hold
        self.arrivals: list[tuple[float, dict[str, object]]] = []
        self.holding = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    async def until(self, condition: Callable[[], bool], within: float = 30.0) -> None:
        """Return once `condition()` holds (checked at each call and each answer), or after
        `within` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, and end the calls it holds."""
        if self._server is not None:
            self._server.close()
        self._closing.set()
        await asyncio.gather(*self._calls, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.time()
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.arrivals.append((arrived, json.loads(body)))
                self._changed.set()
                if self.hold:
                    self.holding += 1
                    self._changed.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), self.hold)
                    self.holding -= 1
                if self._closing.is_set():
                    return
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def end_to_arrival(base: str, fast: Receiver, replies: int, rate: float) -> list[float]:
    """Seconds from each reply's end to its delivery's arrival, over `replies` background
    questions asked `rate` a second, whatever the ones before became."""
    first = len(fast.arrivals)

    async def ask(client: httpx.AsyncClient, n: int) -> None:
        body = {"question": f"bench tokens=20 n={n}", "webhook": "fast"}
        (await client.post(f"{base}/api/conversations", json=body)).raise_for_status()

    async with httpx.AsyncClient(timeout=30) as client, asyncio.TaskGroup() as asking:
        for n in range(replies):
            asking.create_task(ask(client, n))
            await asyncio.sleep(1 / rate)
    await fast.until(lambda: len(fast.arrivals) >= first + replies)
    latencies = []
    for arrived, event in fast.arrivals[first:]:
        ended = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
        latencies.append(arrived - ended.timestamp())
    return latencies


async def hold_deliveries(base: str, slow: Receiver, count: int) -> None:
    """`count` background replies naming `slow`, until all their deliveries are held."""
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(count):
            body = {"question": f"bench tokens=5 held={n}", "webhook": "slow"}
            (await client.post(f"{base}/api/conversations", json=body)).raise_for_status()
    await slow.until(lambda: slow.holding >= count)


async def run(quick: bool) -> None:
    replies, sockets = (100, 20) if quick else (500, 50)
    fast, slow = await Receiver().start(), await Receiver(HELD).start()
    hooks = [
        {"name": "fast", "url": f"http://127.0.0.1:{fast.port}/", "secret": SECRET},
        {"name": "slow", "url": f"http://127.0.0.1:{slow.port}/", "secret": SECRET},
    ]
    with fake_model() as upstream, tempfile.TemporaryDirectory() as folder:
        port = free_port()
        env = server_env(
            upstream,
            CHAT_WEBHOOKS=json.dumps(hooks),
            CHAT_WEBHOOK_CONCURRENCY=str(IN_FLIGHT),
            CHAT_WEBHOOK_TIMEOUT=str(HELD * 2),
            CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{folder}/chat.db",
        )
        with process(["-m", "backend", "--port", str(port)], env=env):
            wait_for_port(port)
            base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/chat"
            await stamped_streams(url, 5)  # warm
            paced = await end_to_arrival(base, fast, replies, RATE)
            burst = await end_to_arrival(base, fast, replies, BURST)
            quiet, quiet_errors = await stamped_streams(url, sockets)
            await hold_deliveries(base, slow, IN_FLIGHT)
            held = slow.holding
            busy, busy_errors = await stamped_streams(url, sockets)
    await fast.close()
    await slow.close()
    print(f"a reply's end -> its webhook's arrival, over {replies} replies (p50 / p99):")
    for name, latencies in ((f"{RATE:g} replies a second", paced), ("all at once", burst)):
        print(f"  {name:22} {ms(percentile(latencies, 50))} / {ms(percentile(latencies, 99))}")
    print(f"token latency added, {sockets} paced streams at once (p50 / p99):")
    print(
        f"  no delivery in flight        {ms(percentile(quiet, 50))} / "
        f"{ms(percentile(quiet, 99))} ({quiet_errors} errors)"
    )
    print(
        f"  {held} deliveries held in flight {ms(percentile(busy, 50))} / "
        f"{ms(percentile(busy, 99))} ({busy_errors} errors)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer replies and streams")
    asyncio.run(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
