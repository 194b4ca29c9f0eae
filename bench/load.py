"""Many slow streams at once: what the chat server adds per token, against a minimal relay.

Starts the fake model, the chat server, the minimal relay (`bench/minimal_relay.py`) and the
SDK relay (`bench/bare_relay.py`), each a process of its own, and measures:

- **paced streams**: S sockets each receive 60 tokens at 20 tokens/s. The fake stamps every
  token with the moment it wrote it, so each token's added latency is its arrival at the
  client minus that stamp (the fake's own pacing drift drops out); tokens are counted, not
  frames. With the CPU each server spent per token relayed (`/proc/PID/stat`).
- **idle sockets**: the growth of each server's resident memory over 2,000 open, idle sockets.
- **time to first token** through the chat server against the SDK calling the fake directly;
  **stop → end** p99; single-stream **throughput** against the SDK relay.

`python -m bench.load [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench.run import (
    FAILURES,
    TOKEN,
    Server,
    cpu_seconds,
    fake_model,
    frame,
    ms,
    percentile,
    process,
    server_env,
    stop_latency,
    throughput,
    ttft_direct,
    ttft_socket,
    wait_for_port,
)

TOKENS = 60
DELAY = 0.05  # 20 tokens/s
IDLE_SOCKETS = 2000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def stamped_streams(url: str, sockets: int) -> tuple[list[float], int]:
    """Every token's arrival minus its stamp, over `sockets` paced streams; and failures."""
    added: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            async with connect(url, compression=None, open_timeout=60) as ws:
                await ws.send(f"bench tokens={TOKENS} delay={DELAY} stamp=1")
                count = 0
                while True:
                    got = await asyncio.wait_for(frame(ws), 60)
                    now = time.time()
                    if got["type"] == "stream" and got["sender"] == "bot":
                        for piece in got["message"].split(TOKEN)[1:]:
                            added.append(now - float(piece.lstrip("|")))
                            count += 1
                    elif got["type"] == "error":
                        errors += 1
                        FAILURES[str(got.get("code"))] += 1
                    elif got["type"] == "end":
                        if count != TOKENS:
                            errors += 1
                            FAILURES[f"{count} of {TOKENS} tokens"] += 1
                        return
        except Exception as exc:
            errors += 1
            FAILURES[type(exc).__name__] += 1

    await asyncio.gather(*(one() for _ in range(sockets)))
    return added, errors


async def paced(server: Server, sockets: int) -> dict[str, float]:
    before = cpu_seconds(server.pid)
    added, errors = await stamped_streams(server.url, sockets)
    cpu = (cpu_seconds(server.pid) - before) / max(1, len(added))
    return {
        "p50": percentile(added, 50),
        "p99": percentile(added, 99),
        "cpu": cpu,
        "errors": errors,
    }


async def idle_memory(server: Server, count: int) -> float:
    """Bytes of resident memory per open, idle socket."""
    before = rss_bytes(server.pid)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count // 100):
            batch = [connect(server.url, compression=None, open_timeout=60) for _ in range(100)]
            await asyncio.gather(*(stack.enter_async_context(c) for c in batch))
        await asyncio.sleep(1.0)
        after = rss_bytes(server.pid)
    return (after - before) / count


async def measure(ours: Server, minimal: Server, sdk: Server, upstream: str, quick: bool) -> None:
    servers = [ours, minimal]
    for server in servers:  # warm both
        await paced(server, 10)
    for sockets in (50, 200):
        results = {}
        for server in servers:
            results[server.name] = await paced(server, sockets)
        print(f"{sockets} sockets x {TOKENS} tokens at 20 tok/s, added latency per token:")
        for server in servers:
            r = results[server.name]
            print(
                f"  {server.name:8} p50 {ms(r['p50'])}, p99 {ms(r['p99'])}, "
                f"server CPU per token {r['cpu'] * 1e6:.0f} µs, sockets with errors "
                f"{r['errors']:.0f}"
            )
        o, m = results[ours.name], results[minimal.name]
        print(
            f"  ratios ours / minimal: p50 {o['p50'] / m['p50']:.2f} (target <= 2), p99 "
            f"{o['p99'] / m['p99']:.2f} (target <= 2), CPU {o['cpu'] / m['cpu']:.2f} "
            "(target <= 1.1)"
        )
    if FAILURES:
        print(f"  failures: {dict(FAILURES)}")
    idle = IDLE_SOCKETS // 4 if quick else IDLE_SOCKETS
    for server in servers:
        per = await idle_memory(server, idle)
        print(f"memory per idle socket, {idle} sockets, {server.name}: {per / 1024:.1f} KB")

    trials = 20 if quick else 60
    await ttft_direct(upstream, 5)
    await ttft_socket(ours.url, 5)
    direct = statistics.median(await ttft_direct(upstream, trials))
    through = statistics.median(await ttft_socket(ours.url, trials))
    print(
        f"time to first token p50: direct {ms(direct)}, through ours {ms(through)}, "
        f"overhead {ms(through - direct)} (target < 2 ms)"
    )
    stops = await stop_latency(ours.url, trials)
    print(f"stop -> end p99: {ms(percentile(stops, 99))} (target < 5 ms)")
    rates: dict[str, list[float]] = {ours.name: [], sdk.name: []}
    for server in (ours, sdk):
        await throughput(server.url, 200)
    for _ in range(3 if quick else 5):
        for server in (ours, sdk):
            rates[server.name].append(await throughput(server.url, 5000))
    ratio = statistics.median(rates[ours.name]) / statistics.median(rates[sdk.name])
    print(
        f"single-stream throughput: ours {statistics.median(rates[ours.name]):,.0f} tok/s, "
        f"SDK relay {statistics.median(rates[sdk.name]):,.0f} tok/s, ratio {ratio:.2f} "
        "(target >= 2)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials, fewer idle sockets")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as data,
        fake_model() as upstream,
        contextlib.ExitStack() as stack,
    ):
        ports = {name: free_port() for name in ("ours", "minimal", "sdk")}
        env = server_env(upstream, CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{data}/chat.db")
        ours = stack.enter_context(process(["-m", "backend", "--port", str(ports["ours"])], env))
        minimal = stack.enter_context(
            process(["-m", "bench.minimal_relay", str(ports["minimal"]), upstream])
        )
        sdk = stack.enter_context(process(["-m", "bench.bare_relay", str(ports["sdk"]), upstream]))
        for port in ports.values():
            wait_for_port(port)
        asyncio.run(
            measure(
                Server("ours", f"ws://127.0.0.1:{ports['ours']}/chat", ours.pid),
                Server("minimal", f"ws://127.0.0.1:{ports['minimal']}/chat", minimal.pid),
                Server("sdk", f"ws://127.0.0.1:{ports['sdk']}/chat", sdk.pid),
                upstream,
                args.quick,
            )
        )


if __name__ == "__main__":
    main()
