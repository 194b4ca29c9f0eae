"""A TCP proxy that holds each direction's bytes for half a round trip: Redis or PostgreSQL on
another machine, emulated on one whose kernel has no netem.

Each chunk read from one side is written to the other `round_trip / 2` after it arrived, in
order (the delays do not add up along a queue). Per target it counts connections, chunks,
bytes and bursts: a burst is what one side sends before the other answers, so the client's
bursts are its round trips (requests sent together, pipelined, are one). With `trace` on it
also keeps when each chunk came, for telling which requests wait on which.

`python -m bench.netdelay --round-trip MS PORT [PORT ...]` prints, on one line, the loopback
port it listens on for each target port, then answers on stdin: `counts` (a line of JSON, by
target port) and `reset`; it exits when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import json
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field

CHUNK = 65536
PR_SET_TIMERSLACK = 29  # <linux/prctl.h>
UP, DOWN = "up", "down"  # client → server, server → client


@dataclass
class Counts:
    """What went through a proxy to one target; `bursts` are by direction."""

    connections: int = 0
    chunks: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    bytes: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    bursts: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})


@dataclass(frozen=True)
class Chunk:
    """One chunk as it came: when (`time.monotonic()`), on which connection (the proxy's port
    towards the target), which way."""

    at: float
    target: int
    source: int
    direction: str
    size: int


def precise_timers() -> None:
    """Wake this thread's timers on time: Linux lets them run up to 50 µs late by default,
    twice per round trip here."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class Link:
    """One client's connection: which side spoke last, for counting bursts."""

    def __init__(self, source: int) -> None:
        self.source = source
        self.last: str | None = None


class NetDelay:
    """Listens on a free loopback port for each of `targets` and forwards to it, holding each
    direction `round_trip / 2` seconds. Runs its own event loop in a thread."""

    def __init__(self, targets: list[int], round_trip: float) -> None:
        self.targets = targets
        self.delay = round_trip / 2
        self.ports: dict[int, int] = {}  # target port → the port to connect to instead
        self.counts = {target: Counts() for target in targets}
        self.trace: list[Chunk] | None = None
        # The local ports of its connections to each target: how a target's own logs (Redis
        # `MONITOR`, PostgreSQL's `%r`) tell this proxy's clients from others.
        self.sources: dict[int, set[int]] = {target: set() for target in targets}
        self._open: set[asyncio.StreamWriter] = set()
        # epoll and poll wait whole milliseconds, which would round a 0.5 ms hold up to 1 ms;
        # select waits microseconds (and the connections here stay far below its 1,024 limit).
        self._loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netdelay", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        precise_timers()
        servers = []
        for target in self.targets:
            server = self._loop.run_until_complete(
                asyncio.start_server(functools.partial(self._connection, target), "127.0.0.1", 0)
            )
            self.ports[target] = server.sockets[0].getsockname()[1]
            servers.append(server)
        self._ready.set()
        self._loop.run_forever()
        for server in servers:
            server.close()
        # Closed sockets read as ended: every connection's tasks finish of themselves.
        for writer in self._open:
            writer.close()
        connections = asyncio.all_tasks(self._loop)
        self._loop.run_until_complete(asyncio.gather(*connections, return_exceptions=True))
        self._loop.close()

    async def _connection(
        self, target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            far_reader, far_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        link = Link(far_writer.get_extra_info("sockname")[1])
        self.sources[target].add(link.source)
        self.counts[target].connections += 1
        self._open |= {writer, far_writer}
        try:
            await asyncio.gather(
                self._pump(reader, far_writer, target, link, UP),
                self._pump(far_reader, writer, target, link, DOWN),
            )
        finally:
            self._open -= {writer, far_writer}

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: int,
        link: Link,
        direction: str,
    ) -> None:
        """Forward what `reader` gives, each chunk `delay` seconds after it came, in order."""
        due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()  # None: the end
        counts = self.counts[target]

        async def deliver() -> None:
            while (chunk := await due.get()) is not None:
                at, data = chunk
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        with suppress(OSError):
            while data := await reader.read(CHUNK):
                now = time.monotonic()
                counts.chunks[direction] += 1
                counts.bytes[direction] += len(data)
                if link.last != direction:
                    counts.bursts[direction] += 1
                    link.last = direction
                if self.trace is not None:
                    self.trace.append(Chunk(now, target, link.source, direction, len(data)))
                due.put_nowait((now + self.delay, data))
        due.put_nowait(None)
        with suppress(OSError):
            await delivering
        writer.close()

    def start(self) -> NetDelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start listening")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def snapshot(self) -> dict[int, Counts]:
        """The counts so far, read on the proxy's own loop."""

        async def copy() -> dict[int, Counts]:
            return {
                target: Counts(
                    counts.connections,
                    dict(counts.chunks),
                    dict(counts.bytes),
                    dict(counts.bursts),
                )
                for target, counts in self.counts.items()
            }

        return asyncio.run_coroutine_threadsafe(copy(), self._loop).result(5)

    def reset(self) -> None:
        """Counts back to zero, and the trace (if kept) emptied."""

        async def zero() -> None:
            for counts in self.counts.values():  # in place: open connections hold them
                counts.connections = 0
                for by_direction in (counts.chunks, counts.bytes, counts.bursts):
                    by_direction.update(dict.fromkeys(by_direction, 0))
            if self.trace is not None:
                self.trace = []

        asyncio.run_coroutine_threadsafe(zero(), self._loop).result(5)


@contextmanager
def netdelay(targets: list[int], round_trip: float) -> Iterator[NetDelay]:
    """A `NetDelay` in a thread of this process for the duration of the block."""
    proxy = NetDelay(targets, round_trip).start()
    try:
        yield proxy
    finally:
        proxy.stop()


class ProxyProcess:
    """A `NetDelay` in a process of its own (`python -m bench.netdelay`): it and a benchmark's
    clients do not wait on each other's interpreter lock."""

    def __init__(self, proc: subprocess.Popen[str], targets: list[int]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        ports = proc.stdout.readline().split()
        if len(ports) != len(targets):
            raise RuntimeError("the proxy process did not start listening")
        self.ports = dict(zip(targets, map(int, ports), strict=True))

    def _ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def counts(self) -> dict[int, Counts]:
        answer = json.loads(self._ask("counts"))
        return {int(target): Counts(**counts) for target, counts in answer.items()}

    def reset(self) -> None:
        self._ask("reset")


@contextmanager
def proxy_process(targets: list[int], round_trip: float) -> Iterator[ProxyProcess]:
    """A `ProxyProcess` for the duration of the block."""
    command = [sys.executable, "-m", "bench.netdelay", "--round-trip", f"{round_trip * 1000:g}"]
    proc = subprocess.Popen(
        [*command, *map(str, targets)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        yield ProxyProcess(proc, targets)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--round-trip", type=float, default=0.0, metavar="MS")
    parser.add_argument("targets", type=int, nargs="+", metavar="PORT")
    args = parser.parse_args()
    with netdelay(args.targets, args.round_trip / 1000) as proxy:
        print(" ".join(str(proxy.ports[target]) for target in args.targets), flush=True)
        for line in sys.stdin:
            match line.strip():
                case "counts":
                    counts = proxy.snapshot()
                    print(json.dumps({t: asdict(c) for t, c in counts.items()}), flush=True)
                case "reset":
                    proxy.reset()
                    print("ok", flush=True)


if __name__ == "__main__":
    main()
