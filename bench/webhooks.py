"""Webhooks: how soon a reply's end reaches a receiver, and whether deliveries slow replies.

Starts the fake model and the chat server (`python -m backend`, SQLite, one worker) with two
endpoints on receivers in this process: `fast`, which answers at once, and `slow`, which holds
every call for a minute. Then:

- **end → arrival**: N background questions (`POST /api/conversations`, naming `fast`), a few
  at a time; for each delivery, its arrival at the receiver minus the event's own `timestamp`
  (when the reply ended, on the same clock), p50 and p99.
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

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
                    await asyncio.sleep(self.hold)
                    self.holding -= 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def end_to_arrival(base: str, fast: Receiver, replies: int) -> list[float]:
    """Seconds from each reply's end to its delivery's arrival, over `replies` replies."""
    gate = asyncio.Semaphore(8)

    async def ask(client: httpx.AsyncClient, n: int) -> None:
        async with gate:
            body = {"question": f"bench tokens=20 n={n}", "webhook": "fast"}
            answer = await client.post(f"{base}/api/conversations", json=body)
            answer.raise_for_status()

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(ask(client, n) for n in range(replies)))
    await fast.until(lambda: len(fast.arrivals) >= replies)
    latencies = []
    for arrived, event in fast.arrivals:
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
    with fake_model() as upstream:
        port = free_port()
        env = server_env(
            upstream,
            CHAT_WEBHOOKS=json.dumps(hooks),
            CHAT_WEBHOOK_CONCURRENCY=str(IN_FLIGHT),
            CHAT_WEBHOOK_TIMEOUT=str(HELD * 2),
        )
        with process(["-m", "backend", "--port", str(port)], env=env):
            wait_for_port(port)
            base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/chat"
            await stamped_streams(url, 5)  # warm
            latencies = await end_to_arrival(base, fast, replies)
            quiet, quiet_errors = await stamped_streams(url, sockets)
            await hold_deliveries(base, slow, IN_FLIGHT)
            held = slow.holding
            busy, busy_errors = await stamped_streams(url, sockets)
    fast.close()
    slow.close()
    print(f"end -> arrival over {len(latencies)} of {replies} replies:")
    print(f"  p50 {ms(percentile(latencies, 50))}, p99 {ms(percentile(latencies, 99))}")
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
