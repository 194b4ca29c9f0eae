"""Two workers whose Redis and PostgreSQL are a round trip of 1 or 2 ms away, against the same
with none, in one run.

On loopback a round trip costs about 0.1 ms; between machines 0.5 to 2 ms, and every one the
worker makes before the model's first token adds to the time to first token. Starts the fake
model, a PostgreSQL and a Redis (`deploy/services.py`), and for each of: no proxy, and a proxy
(`bench/netdelay.py`) holding each direction for half of 0, 1 and 2 ms, two workers whose
`CHAT_REDIS_URL` and `CHAT_DATABASE_URL` point through it. Then, alternating between the
deployments in rounds so that the machine's drift falls on all of them alike:

- **Redis `PING`** through the path: the proxy's own cost, and the round trip it delivers;
- **time to first token** over the SDK calling the fake directly, for a conversation's first
  question and for a follow-up in it; the difference from the 0 ms proxy over the added round
  trip is how many round trips the worker waits on before the first token;
- **stop** sent through worker 2 → `end`, the reply running on worker 1;
- **rejoin** with `after` on worker 2 → first missed frame, the reply running on worker 1;
- **token latency**: 50 streams at 20 tokens/s spread over both workers, each token's arrival
  minus the moment the fake wrote it.

Last, the round trips of a conversation's first question and of two follow-ups, from question
sent to first token: a worker behind a 20 ms proxy that records when each request went, with
Redis `MONITOR` and PostgreSQL's statement log, in waves (requests sent together, each wave
waiting on the one before).

`python -m bench.distance [--quick]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as redis
from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench.cluster import Worker, cross_worker_stop
from bench.load import TOKENS, stamped_streams
from bench.netdelay import UP, Chunk, NetDelay, ProxyProcess, netdelay, proxy_process
from bench.run import (
    FAILURES,
    cpu_seconds,
    fake_model,
    first_token,
    frame,
    percentile,
    process,
    rejoin_latency,
    server_env,
    ttft_direct,
    until_end,
    wait_for_port,
)
from deploy.services import POSTGRES_BIN, Postgres, Redis

ROUND_TRIPS = (None, 0.0, 0.001, 0.002)  # None: no proxy
BASELINE = 0.0
STREAMS = 50
PROFILE_ROUND_TRIP = 0.02
QUESTION = "bench tokens=3"


@dataclass
class Deployment:
    """Two workers behind one proxy (or none), and what was measured through them."""

    round_trip: float | None
    one: Worker
    two: Worker
    proxy: ProxyProcess | None
    pings: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    follow_up: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)
    rejoins: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    errors: int = 0
    # Over the streams: the proxy's CPU seconds, and the requests it passed on, by target port.
    proxy_cpu: float = 0.0
    requests: Counter[int] = field(default_factory=Counter)

    @property
    def name(self) -> str:
        return "no proxy" if self.round_trip is None else f"{self.round_trip * 1000:g} ms"


def pings(port: int, count: int) -> list[float]:
    """Redis `PING` round trips on one connection, blocking, nothing else in between."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            sent = time.perf_counter()
            connection.sendall(b"PING\r\n")
            answer = b""
            while not answer.endswith(b"\r\n"):
                answer += connection.recv(64)
            times.append(time.perf_counter() - sent)
    return times


async def ttft(url: str, trials: int) -> tuple[list[float], list[float]]:
    """Question sent → first token: a conversation's first question, then a follow-up."""
    first: list[float] = []
    follow_up: list[float] = []
    for _ in range(trials):
        async with connect(url, compression=None) as ws:
            await frame(ws)  # the opening info
            for times in (first, follow_up):
                sent = time.perf_counter()
                await ws.send(QUESTION)
                await first_token(ws)
                times.append(time.perf_counter() - sent)
                await until_end(ws)
                await asyncio.sleep(0.05)  # the turn stored and given back, as a reader would
    return first, follow_up


async def measure(
    deployments: list[Deployment], upstream: str, redis_port: int, quick: bool
) -> list[float]:
    """Fill in each deployment's measures, alternating between them; the SDK's own TTFT."""
    trials, rounds = (16, 2) if quick else (80, 4)
    each = trials // rounds
    direct: list[float] = []
    await ttft_direct(upstream, 3)
    for deployment in deployments:  # warm every worker
        await ttft(deployment.one.url, 1)
        await ttft(deployment.two.url, 1)
    for _ in range(rounds):
        direct += await ttft_direct(upstream, each)
        for deployment in deployments:
            reached = deployment.proxy.ports[redis_port] if deployment.proxy else redis_port
            deployment.pings += await asyncio.to_thread(pings, reached, 100)
            first, follow_up = await ttft(deployment.one.url, each)
            deployment.first += first
            deployment.follow_up += follow_up
    for _ in range(rounds):
        for deployment in deployments:
            deployment.stops += await cross_worker_stop(deployment.one, deployment.two, each)
            deployment.rejoins += await rejoin_latency(deployment.one.url, each, deployment.two.url)
    for _ in range(1 if quick else 3):
        for deployment in deployments:
            proxy = deployment.proxy
            if proxy is not None:
                proxy.reset()
                before = cpu_seconds(proxy.proc.pid)
            runs = await asyncio.gather(
                stamped_streams(deployment.one.url, STREAMS // 2),
                stamped_streams(deployment.two.url, STREAMS - STREAMS // 2),
            )
            if proxy is not None:
                deployment.proxy_cpu += cpu_seconds(proxy.proc.pid) - before
                for target, counts in proxy.counts().items():
                    deployment.requests[target] += counts.bursts[UP]
            for added, errors in runs:
                deployment.tokens += added
                deployment.errors += errors
            await asyncio.sleep(0.5)
    return direct


def ms(seconds: float, digits: int = 1) -> str:
    return f"{seconds * 1000:.{digits}f}"


def report(
    deployments: list[Deployment], direct: list[float], redis_port: int, pg_port: int
) -> None:
    """The tables: each measure by deployment, and its difference from the 0 ms proxy."""
    baseline = next(d for d in deployments if d.round_trip == BASELINE)
    model = statistics.median(direct)

    def replies(d: Deployment) -> float:
        return len(d.tokens) / TOKENS

    def median_ping(d: Deployment) -> float:
        return statistics.median(d.pings)

    rows: list[tuple[str, Callable[[Deployment], float], int]] = [
        ("Redis PING through the path, p50", median_ping, 3),
        ("TTFT overhead, first question, p50", lambda d: statistics.median(d.first) - model, 1),
        ("TTFT overhead, follow-up, p50", lambda d: statistics.median(d.follow_up) - model, 1),
        ("stop → end across workers, p50", lambda d: percentile(d.stops, 50), 1),
        ("stop → end across workers, p99", lambda d: percentile(d.stops, 99), 1),
        ("rejoin → first missed frame, p50", lambda d: percentile(d.rejoins, 50), 1),
        ("rejoin → first missed frame, p99", lambda d: percentile(d.rejoins, 99), 1),
        (f"token latency, {STREAMS} streams, p50", lambda d: percentile(d.tokens, 50), 1),
        (f"token latency, {STREAMS} streams, p99", lambda d: percentile(d.tokens, 99), 1),
    ]
    print(f"\nthe SDK's own time to first token (the model's), p50: {ms(model, 2)} ms")
    print("| measure (ms) | " + " | ".join(d.name for d in deployments) + " |")
    print("|---|" + "---|" * len(deployments))
    for label, value, digits in rows:
        cells = []
        for d in deployments:
            cell = ms(value(d), digits)
            if d.round_trip is not None and d.round_trip > BASELINE:
                cell += f" ({(value(d) - value(baseline)) * 1000:+.{digits}f})"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| sockets with errors | " + " | ".join(str(d.errors) for d in deployments) + " |")
    proxied = [d for d in deployments if d.proxy is not None]
    print(f"\nthrough the proxy, {STREAMS} streams of {TOKENS} tokens at 20 tokens/s:")
    print("| | " + " | ".join(d.name for d in proxied) + " |")
    print("|---|" + "---|" * len(proxied))
    rows_through: list[tuple[str, Callable[[Deployment], str]]] = [
        ("the proxy's CPU per token", lambda d: f"{d.proxy_cpu / len(d.tokens) * 1e6:.0f} µs"),
        ("Redis requests per reply", lambda d: f"{d.requests[redis_port] / replies(d):.1f}"),
        ("PostgreSQL requests per reply", lambda d: f"{d.requests[pg_port] / replies(d):.1f}"),
    ]
    for label, per in rows_through:
        print(f"| {label} | " + " | ".join(per(d) for d in proxied) + " |")
    if FAILURES:
        print(f"errors: {dict(FAILURES)}")
    for d in deployments:
        if d.round_trip is None or d.round_trip <= BASELINE:
            continue
        added = median_ping(d) - median_ping(baseline)
        for label, times, base in (
            ("first question", d.first, baseline.first),
            ("follow-up", d.follow_up, baseline.follow_up),
        ):
            extra = statistics.median(times) - statistics.median(base)
            print(
                f"{d.name}: TTFT of a {label} {ms(extra)} ms later = "
                f"{extra / d.round_trip:.1f} round trips of {d.name} "
                f"({extra / added:.1f} of the {ms(added, 2)} ms the proxy adds to a PING)"
            )


@dataclass
class Request:
    """What one connection sent at once (a burst through the proxy), and what the server said
    it ran for it."""

    at: float  # wall clock, as it reached the proxy
    server: str
    source: int  # the proxy's port towards the server: the connection, in the server's logs
    commands: list[str] = field(default_factory=list)


async def monitored(client: redis.Redis, into: list[tuple[float, int, str]]) -> None:
    """Every command Redis runs, with its client's port (a script's, its caller's)."""
    port = 0
    async with client.monitor() as monitor:
        async for command in monitor.listen():
            if command["client_type"] == "tcp":
                port = int(command["client_port"])
            into.append((command["time"], port, command["command"]))


def statements(log: Path) -> list[tuple[float, int, str]]:
    """PostgreSQL's logged statements: lines `EPOCH HOST(PORT) LOG:  statement|execute …`
    (see `log_statements`)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4 or parts[2] != "LOG:" or not parts[1].endswith(")"):
            continue
        with contextlib.suppress(ValueError):
            at, port = float(parts[0]), int(parts[1].rsplit("(", 1)[1].rstrip(")"))
            if parts[3].lstrip().startswith(("statement:", "execute ")):
                found.append((at, port, parts[3].split(": ", 1)[1]))
    return found


def log_statements(postgres: Postgres) -> None:
    """Have PostgreSQL log every statement, stamped with the epoch and the client's port."""
    psql = [str(POSTGRES_BIN / "psql"), "-h", "127.0.0.1", "-p", str(postgres.port)]
    for command in (
        "ALTER SYSTEM SET log_statement = 'all'",
        "ALTER SYSTEM SET log_line_prefix = '%n %r '",
        "SELECT pg_reload_conf()",
    ):
        subprocess.run(
            [*psql, "-U", "chat", "-d", "postgres", "-c", command], check=True, capture_output=True
        )
    time.sleep(0.5)  # the reload is a signal: let every backend take it


def requests(chunks: list[Chunk], servers: dict[int, str], offset: float) -> list[Request]:
    """The bursts each connection sent, from the proxy's trace; `offset` makes its times wall
    clock times."""
    found = []
    last: dict[int, str] = {}
    for chunk in chunks:
        if chunk.direction == UP and last.get(chunk.source) != UP:
            found.append(Request(chunk.at + offset, servers[chunk.target], chunk.source))
        last[chunk.source] = chunk.direction
    return found


def attribute(
    sent: list[Request], server: str, commands: list[tuple[float, int, str]], until: float
) -> None:
    """Each command a server logged before `until` to the last request its connection sent
    before it ran. PostgreSQL stamps whole milliseconds: a command may seem to run up to 1 ms
    early."""
    for at, source, command in commands:
        if at > until:
            continue
        before = [
            request
            for request in sent
            if request.server == server
            and request.source == source
            and request.at + PROFILE_ROUND_TRIP / 2 <= at + 0.002
        ]
        if before:
            short = re.sub(r"[0-9a-f]{32}", "…", command)
            before[-1].commands.append(short if len(short) <= 90 else f"{short[:89]}…")


def waves(sent: list[Request], gap: float) -> list[list[Request]]:
    """Requests grouped where more than `gap` passes between one and the next: each wave
    waits on an answer to the one before."""
    grouped: list[list[Request]] = []
    for request in sorted(sent, key=lambda r: r.at):
        if grouped and request.at - grouped[-1][-1].at <= gap:
            grouped[-1].append(request)
        else:
            grouped.append([request])
    return grouped


async def profile(url: str, proxy: NetDelay, redis_url: str, postgres: Postgres) -> None:
    """The requests of one question, sent → first token, as Redis and PostgreSQL saw them."""
    redis_port, postgres_port = proxy.targets
    servers = {redis_port: "Redis", postgres_port: "PostgreSQL"}
    commands: list[tuple[float, int, str]] = []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    monitoring = asyncio.create_task(monitored(client, commands))
    proxy.trace = []
    try:
        for _ in range(3):  # a worker that has answered before: its pools and caches warm
            await ttft(url, 1)
        async with connect(url, compression=None) as ws:
            await frame(ws)
            for label in ("first question", "follow-up", "second follow-up"):
                await asyncio.sleep(1.0)  # what opening or the last turn began, done
                proxy.reset()
                offset = time.time() - time.monotonic()
                sent = time.perf_counter()
                await ws.send(QUESTION)
                await first_token(ws)
                took = time.perf_counter() - sent
                until = time.time()
                # What reached a server before the first token reached the client.
                sent_by = time.monotonic() - PROFILE_ROUND_TRIP / 2
                found = requests([c for c in proxy.trace if c.at <= sent_by], servers, offset)
                await until_end(ws)
                await asyncio.sleep(0.5)  # the MONITOR lines and the log, written
                attribute(found, "Redis", commands, until)
                attribute(found, "PostgreSQL", statements(postgres.log), until)
                print(
                    f"\n{label}: TTFT {ms(took)} ms behind a {ms(PROFILE_ROUND_TRIP, 0)} ms round "
                    f"trip; requests: Redis {sum(r.server == 'Redis' for r in found)}, "
                    f"PostgreSQL {sum(r.server == 'PostgreSQL' for r in found)}"
                )
                grouped = waves(found, PROFILE_ROUND_TRIP / 2)
                for number, wave in enumerate(grouped, 1):
                    print(f"  wave {number}, +{ms(wave[0].at - grouped[0][0].at, 0)} ms")
                    for request in wave:
                        said = "; ".join(request.commands) or "(nothing it logs)"
                        print(f"    {request.server}: {said}")
    finally:
        monitoring.cancel()
        with contextlib.suppress(asyncio.CancelledError, redis.RedisError):
            await monitoring
        await client.aclose()


@contextmanager
def workers(envs: list[dict[str, str]]) -> Iterator[list[Worker]]:
    """A worker for each environment, all started at once."""
    ports = [free_port() for _ in envs]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(process(["-m", "backend", "--port", str(port)], env))
            for port, env in zip(ports, envs, strict=True)
        ]
        for port in ports:
            wait_for_port(port, 120)
        yield [
            Worker(f"ws://127.0.0.1:{port}/chat", proc.pid)
            for port, proc in zip(ports, procs, strict=True)
        ]


def through(postgres: Postgres, port: int) -> str:
    """A new database's URL, reached on `port` rather than PostgreSQL's own."""
    return postgres.database().replace(f":{postgres.port}/", f":{port}/")


def compare(postgres: Postgres, redis_server: Redis, upstream: str, quick: bool) -> None:
    """Two workers behind each of `ROUND_TRIPS` (but no proxy, if `quick`), measured and
    reported."""
    targets = [redis_server.port, postgres.port]
    env = server_env(upstream)
    settled = [rt for rt in ROUND_TRIPS if rt is not None or not quick]
    with contextlib.ExitStack() as stack:
        envs: list[dict[str, str]] = []
        proxies: list[ProxyProcess | None] = []
        for round_trip in settled:
            proxy = None
            ports = {target: target for target in targets}
            if round_trip is not None:
                proxy = stack.enter_context(proxy_process(targets, round_trip))
                ports = proxy.ports
            proxies.append(proxy)
            scaled = {
                **env,
                "CHAT_REDIS_URL": f"redis://127.0.0.1:{ports[redis_server.port]}/0",
                "CHAT_DATABASE_URL": through(postgres, ports[postgres.port]),
            }
            envs += [scaled, scaled]
        started = stack.enter_context(workers(envs))
        deployments = [
            Deployment(round_trip, started[2 * n], started[2 * n + 1], proxy)
            for n, (round_trip, proxy) in enumerate(zip(settled, proxies, strict=True))
        ]
        direct = asyncio.run(measure(deployments, upstream, redis_server.port, quick))
    report(deployments, direct, redis_server.port, postgres.port)


def round_trips(postgres: Postgres, redis_server: Redis, upstream: str) -> None:
    """One worker behind a `PROFILE_ROUND_TRIP` proxy: the requests of one question."""
    log_statements(postgres)
    with netdelay([redis_server.port, postgres.port], PROFILE_ROUND_TRIP) as proxy:
        env = {
            **server_env(upstream),
            "CHAT_REDIS_URL": f"redis://127.0.0.1:{proxy.ports[redis_server.port]}/0",
            "CHAT_DATABASE_URL": through(postgres, proxy.ports[postgres.port]),
        }
        with workers([env]) as (worker,):
            asyncio.run(profile(worker.url, proxy, redis_server.url, postgres))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials and rounds")
    args = parser.parse_args()
    postgres, redis_server = Postgres(), Redis()
    try:
        postgres.start()
        redis_server.start()
        with fake_model() as upstream:
            compare(postgres, redis_server, upstream, args.quick)
            round_trips(postgres, redis_server, upstream)
    finally:
        postgres.remove()
        redis_server.remove()


if __name__ == "__main__":
    main()
