"""What signing in and quotas cost, against the fake model server, in one run.

Four chat servers on the same fake model: with `CHAT_AUTH=none` and no quotas ("open"), and
with `CHAT_AUTH=token` (a JWT on every socket) and all four quotas set high enough never to
refuse ("guarded"); each in one process with its counts in memory, and again with them in
Redis (`CHAT_REDIS_URL`, as when scaled out). Time to first token is measured one question
per server in turn, so each guarded sample sits next to its open twin's, taken under the same
load; relay throughput in interleaved rounds. `python -m bench.guarded [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass

import jwt
from websockets.asyncio.client import ClientConnection, connect

from backend.process.server import free_port
from bench.run import (
    fake_model,
    first_token,
    frame,
    ms,
    process,
    server_env,
    throughput,
    ttft_direct,
    until_end,
    wait_for_port,
)
from deploy.services import Redis

SECRET = "bench-secret-that-is-long-enough-for-hs256"
QUOTAS = {
    "CHAT_QUOTA_QUESTIONS": "1000000/minute",
    "CHAT_QUOTA_TOKENS": "1000000000/day",
    "CHAT_QUOTA_REPLIES": "1000",
    "CHAT_QUOTA_CONNECTIONS": "1000",
}


# Each server: its name, where its quotas count, whether it checks tokens and quotas. The
# twin is a second open server, the control: what two identical servers differ by here.
VARIANTS = [
    ("open/memory", "memory", False),
    ("guarded/memory", "memory", True),
    ("open/redis", "redis", False),
    ("guarded/redis", "redis", True),
    ("open/memory twin", "memory", False),
]


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    headers: dict[str, str]


async def one_first_token(ws: ClientConnection) -> float:
    """One question on `ws`: question sent to first token received; then a new conversation."""
    sent = time.perf_counter()
    await ws.send("bench tokens=3")
    await first_token(ws)
    elapsed = time.perf_counter() - sent
    await until_end(ws)
    await ws.send(json.dumps({"type": "reset"}))
    await frame(ws)  # its acknowledgement
    return elapsed


async def paired_first_tokens(servers: list[Server], trials: int) -> dict[str, list[float]]:
    """Time to first token on every server, one question each in turn (in an order that
    changes every trial), so that each sample is taken under the same conditions as its
    neighbours on the other servers."""
    times: dict[str, list[float]] = {server.name: [] for server in servers}
    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(
                connect(server.url, compression=None, additional_headers=server.headers)
            )
            for server in servers
        ]
        for ws in sockets:
            await frame(ws)  # the opening info
        for trial in range(trials):
            order = list(zip(servers, sockets, strict=True))
            for server, ws in order if trial % 2 == 0 else order[::-1]:
                times[server.name].append(await one_first_token(ws))
                await asyncio.sleep(0.002)
    return times


async def measure(servers: list[Server], upstream: str, quick: bool) -> None:
    trials = 150 if quick else 600
    await paired_first_tokens(servers, 20)  # warm every path first
    first = await paired_first_tokens(servers, trials)
    rates: dict[str, list[float]] = {server.name: [] for server in servers}
    for server in servers:
        await throughput(server.url, 200, additional_headers=server.headers)
    for round_ in range(3 if quick else 7):
        for server in servers if round_ % 2 == 0 else servers[::-1]:
            rates[server.name].append(
                await throughput(
                    server.url, 2000 if quick else 5000, additional_headers=server.headers
                )
            )
    direct = statistics.median(await ttft_direct(upstream, 40))
    print(f"direct SDK time to first token p50: {ms(direct)}")
    for server in servers:
        print(
            f"{server.name}: time to first token p50 {ms(statistics.median(first[server.name]))}"
            f", throughput {statistics.median(rates[server.name]):,.0f} tok/s"
        )
    comparisons = [
        ("control: two open servers differ by", "open/memory", "open/memory twin"),
        ("memory: auth + quotas add", "open/memory", "guarded/memory"),
        ("redis: auth + quotas add", "open/redis", "guarded/redis"),
    ]
    for label, open_, guarded in comparisons:
        added = statistics.median(first[guarded]) - statistics.median(first[open_])
        paired = statistics.median(g - o for g, o in zip(first[guarded], first[open_], strict=True))
        ratio = statistics.median(rates[guarded]) / statistics.median(rates[open_])
        print(
            f"{label} {added * 1000:+.2f} ms to time to first token p50 "
            f"(median of paired differences {paired * 1000:+.2f} ms; target < 0.5 ms); "
            f"throughput guarded / open {ratio:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and trials")
    args = parser.parse_args()
    bearer = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, "HS256")
    redis = Redis()
    redis.start()
    try:
        with (
            tempfile.TemporaryDirectory() as data,
            fake_model() as upstream,
            contextlib.ExitStack() as stack,
        ):
            servers: list[Server] = []
            for name, storage, guarded in VARIANTS:
                port = free_port()
                env = server_env(
                    upstream,
                    CHAT_DATABASE_URL=f"sqlite+aiosqlite:///{data}/{len(servers)}.db",
                    **({"CHAT_REDIS_URL": redis.url} if storage == "redis" else {}),
                    **(
                        {"CHAT_AUTH": "token", "CHAT_JWT_SECRET": SECRET, **QUOTAS}
                        if guarded
                        else {}
                    ),
                )
                stack.enter_context(process(["-m", "backend", "--port", str(port)], env))
                wait_for_port(port)
                headers = {"Authorization": f"Bearer {bearer}"} if guarded else {}
                servers.append(Server(name, f"ws://127.0.0.1:{port}/chat", headers))
            asyncio.run(measure(servers, upstream, args.quick))
    finally:
        redis.remove()


if __name__ == "__main__":
    main()
