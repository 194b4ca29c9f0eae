"""What scaling out costs, against the fake model server, in one run.

Starts the fake model, a PostgreSQL and a Redis (`deploy/services.py`), the single process on
SQLite (the default deployment), and two workers on Redis and PostgreSQL, then measures:

- stop sent through one worker → `end` there, while the reply runs on the other;
- rejoin with `after` on the other worker → first missed frame;
- relay throughput, and CPU per token with 50 and 200 sockets at 20 tokens/s (40-token
  replies), one worker on Redis + PostgreSQL (their CPU included, PostgreSQL's backends too)
  against the single process on SQLite, in pairs run back to back;
- capacity: the most streams at 20 tokens/s held with p99 added latency under 100 ms, for
  one worker and for two (the clients spread their sockets over the workers as a load
  balancer would), with the CPU each part spent per token relayed.

`python -m bench.cluster [--quick]`. Clients, model, Redis, PostgreSQL and workers all share
this machine's cores: the capacity found is the machine's, not a worker's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect

from backend.process.server import free_port
from bench.cpu import cpu_seconds_tree
from bench.run import (
    FAILURES,
    fake_model,
    first_token,
    frame,
    ms,
    paced_streams,
    percentile,
    process,
    rejoin_latency,
    server_env,
    throughput,
    until_end,
    wait_for_port,
)
from deploy.services import Postgres, Redis, children

PACED_TOKENS = 40
PACED_DELAY = 0.05  # 20 tokens/s
CAPACITY_P99 = 0.1


@dataclass(frozen=True)
class Worker:
    url: str
    pid: int


@contextmanager
def worker(env: dict[str, str]) -> Iterator[Worker]:
    port = free_port()
    with process(["-m", "backend", "--port", str(port)], env) as proc:
        wait_for_port(port)
        yield Worker(f"ws://127.0.0.1:{port}/chat", proc.pid)


async def opened(url: str) -> tuple[ClientConnection, str]:
    """A socket and its conversation id."""
    ws = await connect(url, compression=None)
    return ws, (await frame(ws))["conversation"]


async def cross_worker_stop(one: Worker, two: Worker, trials: int) -> list[float]:
    """The reply runs on `one`; stop is sent through `two`: sent → `end` received on `two`."""
    latencies = []
    for trial in range(trials):
        asker, conversation = await opened(one.url)
        stopper = await connect(f"{two.url}?conversation={conversation}", compression=None)
        await frame(stopper)
        await asker.send("bench tokens=100000 delay=0.005")
        await first_token(stopper)
        await asyncio.sleep(0.01 + (trial % 5) * 0.01)
        sent = time.perf_counter()
        await stopper.send(json.dumps({"type": "stop"}))
        await until_end(stopper)
        latencies.append(time.perf_counter() - sent)
        await until_end(asker)
        await asker.close()
        await stopper.close()
    return latencies


@dataclass
class Paced:
    p50: float
    p99: float
    errors: int
    cpu: dict[str, float]  # seconds per token, by process


async def paced(urls: list[str], pids: dict[str, int], sockets: int) -> Paced:
    """`sockets` streams at 20 tokens/s, spread over `urls`; CPU per token of each of `pids`."""
    before = {name: cpu_seconds_tree(pid) for name, pid in pids.items()}
    shares = [sockets // len(urls) + (n < sockets % len(urls)) for n in range(len(urls))]
    runs = await asyncio.gather(
        *(
            paced_streams(url, share, PACED_TOKENS, PACED_DELAY)
            for url, share in zip(urls, shares, strict=True)
        )
    )
    late = [value for lateness, _ in runs for value in lateness]
    tokens = sockets * PACED_TOKENS
    cpu = {name: (cpu_seconds_tree(pid) - before[name]) / tokens for name, pid in pids.items()}
    return Paced(percentile(late, 50), percentile(late, 99), sum(errors for _, errors in runs), cpu)


async def paired_cost(
    single: Worker, one: Worker, shared: dict[str, int], sockets: int, pairs: int
) -> None:
    """The same paced load on the single process and on one worker (with its Redis and
    PostgreSQL), back to back, `pairs` times: the distributed path's CPU per token over the
    single process's, each pair measured under the same load from the rest of the machine."""
    ratios = []
    for _ in range(pairs):
        alone = await paced([single.url], {"server": single.pid}, sockets)
        spread = await paced([one.url], {"worker": one.pid, **shared}, sockets)
        ratio = sum(spread.cpu.values()) / alone.cpu["server"]
        ratios.append(ratio)
        print(
            f"{sockets} sockets x 20 tok/s, CPU per token: single process on SQLite "
            f"{cpu_text(alone.cpu)} (p99 added delay {ms(alone.p99)}); one worker on Redis + "
            f"PostgreSQL {cpu_text(spread.cpu)} (p99 {ms(spread.p99)}); ratio {ratio:.2f}; "
            f"errors {alone.errors + spread.errors}"
        )
        await asyncio.sleep(1)
    print(
        f"{sockets} sockets: distributed / single CPU per token, median of {pairs} pairs: "
        f"{statistics.median(ratios):.2f}  (target <= 1.3)"
    )


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds * 1e6:.0f} µs" for name, seconds in cpu.items())


async def capacity(
    urls: list[str], pids: dict[str, int], steps: list[int], label: str
) -> tuple[int, Paced | None]:
    """The most sockets of `steps` held with p99 added latency < 100 ms and no errors."""
    held: int = 0
    at_held: Paced | None = None
    for sockets in steps:
        result = await paced(urls, pids, sockets)
        ok = result.p99 < CAPACITY_P99 and result.errors == 0
        print(
            f"  {label}, {sockets} streams: p50 {ms(result.p50)}, p99 {ms(result.p99)}, "
            f"errors {result.errors}, CPU per token: {cpu_text(result.cpu)}"
            f"{'' if ok else '  ← over'}"
        )
        if FAILURES:
            print(f"    errors: {dict(FAILURES)}")
            FAILURES.clear()
        if not ok:
            break
        held, at_held = sockets, result
        await asyncio.sleep(1)
    return held, at_held


async def measure(
    single: Worker, one: Worker, two: Worker, shared: dict[str, int], quick: bool
) -> None:
    trials = 20 if quick else 100
    stops = await cross_worker_stop(one, two, trials)
    print(
        f"cross-worker stop → end, {trials} trials: p50 {ms(percentile(stops, 50))}, "
        f"p99 {ms(percentile(stops, 99))}  (target p99 < 10 ms)"
    )
    # Asked on worker 1, rejoined on worker 2.
    rejoins = await rejoin_latency(one.url, trials, two.url)
    print(
        f"cross-worker rejoin → first missed frame, {trials} trials: p50 "
        f"{ms(percentile(rejoins, 50))}, p99 {ms(percentile(rejoins, 99))}  (target p99 < 20 ms)"
    )

    tokens, rounds = (2000, 3) if quick else (5000, 5)
    rates: dict[str, list[float]] = {"sqlite": [], "cluster": []}
    for url in (single.url, one.url):
        await throughput(url, 200)
    for _ in range(rounds):
        rates["sqlite"].append(await throughput(single.url, tokens))
        rates["cluster"].append(await throughput(one.url, tokens))
    alone, spread = statistics.median(rates["sqlite"]), statistics.median(rates["cluster"])
    print(
        f"relay throughput, {tokens} tokens, median of {rounds}: single process on SQLite "
        f"{alone:.0f} tok/s, one worker on Redis + PostgreSQL {spread:.0f} tok/s, "
        f"ratio {spread / alone:.2f}  (target >= 0.8)"
    )

    for sockets in (50, 200):
        await paired_cost(single, one, shared, sockets, 3)

    steps = [50, 100, 200] if quick else [50, 100, 150, 200, 300, 400, 600, 800]
    print("capacity: streams at 20 tokens/s with p99 added latency < 100 ms")
    found = {}
    for label, urls, pids in (
        ("1 worker", [one.url], {"worker 1": one.pid, **shared}),
        ("2 workers", [one.url, two.url], {"worker 1": one.pid, "worker 2": two.pid, **shared}),
    ):
        found[label] = await capacity(urls, pids, steps, label)
    for label, (held, at_held) in found.items():
        detail = f", CPU per token: {cpu_text(at_held.cpu)}" if at_held else ""
        print(f"{label}: {held} streams held{detail}")


def shared_pids(postgres: Postgres, redis: Redis) -> dict[str, int]:
    """Redis's and the PostgreSQL postmaster's pids (the servers, not `runuser`)."""
    found = {}
    for name, service in (("redis", redis), ("postgres", postgres)):
        assert service.process is not None
        pids = children(service.process.pid)
        found[name] = pids[0] if pids else service.process.pid
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and sockets")
    args = parser.parse_args()
    postgres, redis = Postgres(), Redis()
    stop: list[Callable[[], None]] = [postgres.remove, redis.remove]
    try:
        postgres.start()
        redis.start()
        with (
            tempfile.TemporaryDirectory() as data,
            fake_model() as upstream,
            contextlib.ExitStack() as stack,
        ):
            env = server_env(upstream)
            single = stack.enter_context(
                worker({**env, "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{data}/chat.db"})
            )
            scaled = {
                **env,
                "CHAT_DATABASE_URL": postgres.database(),
                "CHAT_REDIS_URL": redis.url,
            }
            one = stack.enter_context(worker(scaled))
            two = stack.enter_context(worker(scaled))
            asyncio.run(measure(single, one, two, shared_pids(postgres, redis), args.quick))
    finally:
        for step in stop:
            step()


if __name__ == "__main__":
    main()
