"""Latency and throughput of the chat server against the fake model server, in one run.

Every number that depends on the machine is reported next to a baseline measured in the same
run: the openai SDK calling the same fake directly, and a bare SDK-to-WebSocket relay
(`bench/bare_relay.py`). Each server runs in a process of its own, the chat server with its
conversation store on (a SQLite file in a temporary folder).
`python -m bench.run [--quick] [--before CHECKOUT]`: with `--before`, the chat server of
another checkout (an earlier commit, say) is measured in the same run too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from websockets.asyncio.client import ClientConnection, connect

from backend.process.server import free_port

TOKEN = " tok"
# What went wrong on the sockets counted as errors, by kind (printed by the benchmarks).
FAILURES: collections.Counter[str] = collections.Counter()


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@contextmanager
def process(
    args: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def fake_model() -> Iterator[str]:
    """The fake OpenAI-compatible model in its own process; yields its base URL."""
    with process(["-m", "fakes.openai_server"]) as fake:
        assert fake.stdout is not None
        yield fake.stdout.readline().strip()


def server_env(upstream: str, **settings: str) -> dict[str, str]:
    """The chat server's environment for talking to the fake model at `upstream`."""
    return {
        "OPENAI_BASE_URL": upstream,
        "OPENAI_API_KEY": "",
        "CHAT_MODEL": "fake-model",
        "CHAT_HISTORY_TOKENS": "200",
        **settings,
    }


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def frame(ws: ClientConnection) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await ws.recv())
    return data


async def first_token(ws: ClientConnection) -> None:
    while True:
        got = await frame(ws)
        if got["type"] == "stream" and got["sender"] == "bot":
            return


async def until_end(ws: ClientConnection) -> int:
    """Read to the bot's `end`; the number of tokens streamed."""
    tokens = 0
    while True:
        got = await frame(ws)
        if got["type"] == "stream" and got["sender"] == "bot":
            tokens += got["message"].count(TOKEN)
        elif got["type"] == "end":
            return tokens


async def stop_latency(url: str, trials: int) -> list[float]:
    """Stop sent to `end` received, with the model streaming a token every 5 ms."""
    latencies = []
    async with connect(url, compression=None) as ws:
        for trial in range(trials):
            await ws.send("bench tokens=100000 delay=0.005")
            await first_token(ws)
            await asyncio.sleep(0.01 + (trial % 5) * 0.01)
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "stop"}))
            await until_end(ws)
            latencies.append(time.perf_counter() - sent)
            await ws.send(json.dumps({"type": "reset"}))
            await frame(ws)
    return latencies


async def ttft_socket(url: str, trials: int, **options: Any) -> list[float]:
    """Question sent to first token received, through a WebSocket server."""
    times = []
    async with connect(url, compression=None, **options) as ws:
        for _ in range(trials):
            sent = time.perf_counter()
            await ws.send("bench tokens=3")
            await first_token(ws)
            times.append(time.perf_counter() - sent)
            await until_end(ws)
            await ws.send(json.dumps({"type": "reset"}))
            await asyncio.sleep(0.01)
    return times


async def ttft_direct(upstream: str, trials: int) -> list[float]:
    """Request sent to first token received, the openai SDK calling the fake itself."""
    client = openai.AsyncOpenAI(base_url=upstream, api_key="not-needed", max_retries=0)
    times = []
    for _ in range(trials):
        sent = time.perf_counter()
        stream = await client.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "bench tokens=3"}],
            stream=True,
        )
        got_first = False
        async for chunk in stream:
            if not got_first and chunk.choices and chunk.choices[0].delta.content:
                times.append(time.perf_counter() - sent)
                got_first = True
        await asyncio.sleep(0.01)
    await client.close()
    return times


async def throughput(url: str, tokens: int, **options: Any) -> float:
    """Tokens per second to one client, question sent to `end` received."""
    async with connect(url, compression=None, max_size=None, **options) as ws:
        sent = time.perf_counter()
        await ws.send(f"bench tokens={tokens}")
        got = await until_end(ws)
        elapsed = time.perf_counter() - sent
    assert got == tokens, f"expected {tokens} tokens, got {got}"
    return tokens / elapsed


async def paced_streams(
    url: str, sockets: int, tokens: int, delay: float
) -> tuple[list[float], int]:
    """Many sockets at `1/delay` tokens/s each: how late each token is, and how many failed.

    A token's lateness is its arrival minus (first token's arrival + index x delay): the delay
    the path added on top of the model's own pace.
    """
    lateness: list[float] = []
    errors = 0

    async def one(n: int) -> None:
        nonlocal errors
        try:
            async with connect(url, compression=None, open_timeout=30) as ws:
                await ws.send(f"bench tokens={tokens} delay={delay}")
                arrivals: list[float] = []
                while True:
                    got = await asyncio.wait_for(frame(ws), 30)
                    now = time.perf_counter()
                    if got["type"] == "stream" and got["sender"] == "bot":
                        arrivals += [now] * got["message"].count(TOKEN)
                    elif got["type"] == "error":
                        errors += 1
                        FAILURES[got.get("code", "?")] += 1
                    elif got["type"] == "end":
                        if got.get("status") != "completed" or len(arrivals) != tokens:
                            errors += 1
                            FAILURES[f"{got.get('status')}, {len(arrivals)} tokens"] += 1
                        break
                start = arrivals[0]
                lateness.extend(max(0.0, t - (start + i * delay)) for i, t in enumerate(arrivals))
        except Exception as exc:
            errors += 1
            FAILURES[type(exc).__name__] += 1

    await asyncio.gather(*(one(n) for n in range(sockets)))
    return lateness, errors


async def rejoin_latency(url: str, trials: int, rejoin_url: str | None = None) -> list[float]:
    """A client that left a streaming reply comes back with `after` (at `rejoin_url`, another
    worker, if given): connect → first missed frame.

    The reply streams a token every 5 ms all along, so there is always something missed.
    """
    back = rejoin_url or url
    async with connect(url, compression=None) as ws:
        conversation = (await frame(ws))["conversation"]
        await ws.send("bench tokens=100000 delay=0.005")
        seen = 0
        while not seen:
            got = await frame(ws)
            if got["type"] == "stream" and got["sender"] == "bot":
                seen = got["seq"]
    latencies = []
    for trial in range(trials):
        await asyncio.sleep(0.01 + (trial % 5) * 0.01)
        sent = time.perf_counter()
        async with connect(
            f"{back}?conversation={conversation}&after={seen}", compression=None
        ) as ws:
            await frame(ws)  # the opening info
            missed = await frame(ws)
            latencies.append(time.perf_counter() - sent)
            assert missed["seq"] > seen, (missed, seen)
            seen = missed["seq"]
    async with connect(f"{url}?conversation={conversation}", compression=None) as ws:
        await ws.send(json.dumps({"type": "stop"}))
        while (await frame(ws))["type"] != "end":
            pass
    return latencies


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def paced_cpu(url: str, pid: int, sockets: int) -> tuple[list[float], int, float]:
    """`paced_streams` at 20 tokens/s, and the server's CPU time per token relayed."""
    tokens = 40
    before = cpu_seconds(pid)
    late, errors = await paced_streams(url, sockets, tokens, 0.05)
    return late, errors, (cpu_seconds(pid) - before) / (sockets * tokens)


async def measure(
    ours: Server, bare: Server, upstream: str, quick: bool, earlier: Server | None
) -> dict[str, Any]:
    trials = 20 if quick else 60
    results: dict[str, Any] = {}

    stops = await stop_latency(ours.url, trials)
    results["stop_p50"], results["stop_p99"] = percentile(stops, 50), percentile(stops, 99)
    print(
        f"stop latency over {trials} trials: p50 {ms(results['stop_p50'])}, "
        f"p99 {ms(results['stop_p99'])}  (target p99 < 50 ms)"
    )

    rejoins = await rejoin_latency(ours.url, trials)
    results["rejoin_p50"], results["rejoin_p99"] = percentile(rejoins, 50), percentile(rejoins, 99)
    print(
        f"rejoin with after → first missed frame over {trials} trials: p50 "
        f"{ms(results['rejoin_p50'])}, p99 {ms(results['rejoin_p99'])}  (target p99 < 20 ms)"
    )

    await ttft_direct(upstream, 5)  # warm both paths before timing
    await ttft_socket(ours.url, 5)
    direct = await ttft_direct(upstream, trials)
    through = await ttft_socket(ours.url, trials)
    results["ttft_direct_p50"] = statistics.median(direct)
    results["ttft_ours_p50"] = statistics.median(through)
    overhead = results["ttft_ours_p50"] - results["ttft_direct_p50"]
    results["ttft_overhead_p50"] = overhead
    print(
        f"time to first token p50: direct SDK {ms(results['ttft_direct_p50'])}, through the "
        f"server {ms(results['ttft_ours_p50'])}, overhead {ms(overhead)}  (target < 3.5 ms)"
    )
    if earlier is not None:
        await ttft_socket(earlier.url, 5)
        direct = await ttft_direct(upstream, trials)
        through = await ttft_socket(earlier.url, trials)
        before = statistics.median(through) - statistics.median(direct)
        results["ttft_overhead_p50_before"] = before
        print(f"time to first token p50 overhead, before: {ms(before)}")

    tokens = 2000 if quick else 5000
    rounds = 3 if quick else 5
    servers = [ours, bare] + ([earlier] if earlier else [])
    rates: dict[str, list[float]] = {server.name: [] for server in servers}
    for server in servers:
        await throughput(server.url, 200)
    for _ in range(rounds):
        for server in servers:
            rates[server.name].append(await throughput(server.url, tokens))
    for server in servers:
        results[f"tps_{server.name}"] = statistics.median(rates[server.name])
    for server in servers:
        if server is not bare:
            ratio = results[f"tps_{server.name}"] / results["tps_bare"]
            results[f"tps_ratio_{server.name}"] = ratio
            print(
                f"relay throughput, {tokens} tokens, median of {rounds}: {server.name} "
                f"{results[f'tps_{server.name}']:.0f} tok/s, bare relay "
                f"{results['tps_bare']:.0f} tok/s, ratio {ratio:.2f}  (target >= 2.0)"
            )

    sockets = 50 if quick else 200
    for server in servers:
        late, errors, cpu = await paced_cpu(server.url, server.pid, sockets)
        results[f"paced_p50_{server.name}"] = percentile(late, 50)
        results[f"paced_p99_{server.name}"] = percentile(late, 99)
        results[f"paced_errors_{server.name}"] = errors
        results[f"cpu_per_token_{server.name}"] = cpu
        print(
            f"{sockets} sockets x 20 tok/s, {server.name}: added delay p50 "
            f"{ms(results[f'paced_p50_{server.name}'])}, p99 "
            f"{ms(results[f'paced_p99_{server.name}'])}, server CPU per token "
            f"{cpu * 1e6:.0f} µs, sockets with errors {errors}"
        )
    return results


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    pid: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and sockets")
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="also measure the chat server of this checkout"
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as data,
        fake_model() as upstream,
    ):
        ours_port, bare_port, before_port = free_port(), free_port(), free_port()
        env = server_env(upstream, CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{data}/chat.db")
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(process(["-m", "backend", "--port", str(ours_port)], env))
            bare = stack.enter_context(
                process(["-m", "bench.bare_relay", str(bare_port), upstream])
            )
            earlier = None
            if args.before:
                before_env = {**env, "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{data}/b.db"}
                before_args = ["-m", "backend", "--port", str(before_port)]
                proc = stack.enter_context(process(before_args, before_env, cwd=args.before))
                wait_for_port(before_port)
                earlier = Server("before", f"ws://127.0.0.1:{before_port}/chat", proc.pid)
            wait_for_port(ours_port)
            wait_for_port(bare_port)
            asyncio.run(
                measure(
                    Server("ours", f"ws://127.0.0.1:{ours_port}/chat", ours.pid),
                    Server("bare", f"ws://127.0.0.1:{bare_port}/chat", bare.pid),
                    upstream,
                    args.quick,
                    earlier,
                )
            )


if __name__ == "__main__":
    main()
