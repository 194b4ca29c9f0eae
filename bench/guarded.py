"""What signing in and quotas cost, against the fake model server, in one run.

Four chat servers on the same fake model: with `CHAT_AUTH=none` and no quotas ("open"), and
with `CHAT_AUTH=token` (a JWT on every socket) and all four quotas set high enough never to
refuse ("guarded"); each in one process with its counts in memory, and again with them in
Redis (`CHAT_REDIS_URL`, as when scaled out). Time to first token and relay throughput are
measured in interleaved rounds, so each guarded server is compared with its open twin under
the same load. `python -m bench.guarded [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass

import jwt

from backend.server import free_port
from bench.run import ms, process, throughput, ttft_direct, ttft_socket, wait_for_port
from deploy.services import Redis

SECRET = "bench-secret-that-is-long-enough-for-hs256"
QUOTAS = {
    "CHAT_QUOTA_QUESTIONS": "1000000/minute",
    "CHAT_QUOTA_TOKENS": "1000000000/day",
    "CHAT_QUOTA_REPLIES": "1000",
    "CHAT_QUOTA_CONNECTIONS": "1000",
}


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    headers: dict[str, str]


async def measure(servers: list[Server], upstream: str, quick: bool) -> None:
    rounds = 4 if quick else 10
    trials = 20 if quick else 40
    first: dict[str, list[float]] = {server.name: [] for server in servers}
    rates: dict[str, list[float]] = {server.name: [] for server in servers}
    for server in servers:  # warm every path first
        await ttft_socket(server.url, 5, additional_headers=server.headers)
        await throughput(server.url, 200, additional_headers=server.headers)
    await ttft_direct(upstream, 5)
    for _ in range(rounds):
        for server in servers:
            first[server.name] += await ttft_socket(
                server.url, trials, additional_headers=server.headers
            )
            rates[server.name].append(
                await throughput(
                    server.url, 2000 if quick else 5000, additional_headers=server.headers
                )
            )
    direct = statistics.median(await ttft_direct(upstream, trials))
    print(f"direct SDK time to first token p50: {ms(direct)}")
    for server in servers:
        print(
            f"{server.name}: time to first token p50 {ms(statistics.median(first[server.name]))}"
            f", throughput {statistics.median(rates[server.name]):,.0f} tok/s"
        )
    for storage in ("memory", "redis"):
        open_, guarded = f"open/{storage}", f"guarded/{storage}"
        added = statistics.median(first[guarded]) - statistics.median(first[open_])
        ratio = statistics.median(rates[guarded]) / statistics.median(rates[open_])
        print(
            f"{storage}: auth + quotas add {added * 1000:+.2f} ms to time to first token "
            f"(target < 0.5 ms); throughput guarded / open {ratio:.3f}"
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
            process(["-m", "fakes.openai_server"]) as fake,
            contextlib.ExitStack() as stack,
        ):
            assert fake.stdout is not None
            upstream = fake.stdout.readline().strip()
            servers: list[Server] = []
            for storage in ("memory", "redis"):
                for guarded in (False, True):
                    name = f"{'guarded' if guarded else 'open'}/{storage}"
                    port = free_port()
                    env = {
                        "OPENAI_BASE_URL": upstream,
                        "OPENAI_API_KEY": "",
                        "CHAT_MODEL": "fake-model",
                        "CHAT_HISTORY_TOKENS": "200",
                        "CHAT_DATABASE_URL": f"sqlite+aiosqlite:///{data}/{len(servers)}.db",
                        **({"CHAT_REDIS_URL": redis.url} if storage == "redis" else {}),
                        **(
                            {"CHAT_AUTH": "token", "CHAT_JWT_SECRET": SECRET, **QUOTAS}
                            if guarded
                            else {}
                        ),
                    }
                    stack.enter_context(process(["-m", "backend", "--port", str(port)], env))
                    wait_for_port(port)
                    headers = {"Authorization": f"Bearer {bearer}"} if guarded else {}
                    servers.append(Server(name, f"ws://127.0.0.1:{port}/chat", headers))
            asyncio.run(measure(servers, upstream, args.quick))
    finally:
        redis.remove()


if __name__ == "__main__":
    main()
