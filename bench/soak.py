"""A bounded soak: many sockets churning over two workers for minutes, every reply checked,
and what each part of the deployment holds sampled from start to end.

Starts the fake model, a PostgreSQL and a Redis (`deploy/services.py`), a webhook receiver in
this process (an endpoint that hears of every conversation) and two workers on Redis and
PostgreSQL with quotas set too high to refuse anything, so that their keys are made and
counted. Each virtual client holds a socket on a random worker and, after a pause, one of:

- **complete**: asks, reads to `end`; the text must be exactly what the fake streams;
- **drop**: asks, drops the connection mid-reply and rejoins (on a random worker) with
  `after` = the last `seq` it saw; what it read before and after must make the whole text;
- **stop**: asks, sends `stop` mid-reply; the text must be a prefix, the `end` `interrupted`;
- **delete**: asks, deletes the conversation over REST (mid-reply or after it), sees its socket
  closed with 1008, and opens a new conversation;
- **leave**: closes the socket and opens a new conversation, keeping the old one;
- **unused**: opens another conversation on the side and closes it without asking.

Every few seconds it samples each worker's resident memory and CPU time (`/proc`), Redis's
`used_memory`, key count and keys without a TTL, and PostgreSQL's row counts. When the churn
ends it waits for watchers, slots and idle conversations to go, scans every Redis key (its TTL,
and which conversation it is about: kept, deleted or never asked in), holds the rows against
what the clients did, tries to join deleted conversations whose keys are left (each must be
refused), and sums the workers' warnings and errors.

`python -m bench.soak [--full] [--minutes N] [--sockets N] [--every S] [--logs FOLDER]`: 200
sockets for one minute by default; `--full` is 1,000 sockets for ten minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import httpx
import redis.asyncio as redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.load import rss_bytes
from bench.run import TOKEN, cpu_seconds, fake_model, server_env
from bench.sockets import raise_open_files
from bench.webhooks import SECRET, Receiver
from deploy.services import Postgres, Redis, Worker

# The share of each action in a client's loop.
ACTIONS = {"complete": 40, "drop": 20, "stop": 15, "delete": 10, "leave": 10, "unused": 5}
RATE = 25.0  # questions a second, over all clients: a client's pause is sockets / RATE
ACTION_WITHIN = 60.0  # seconds one action may take before it counts as failed
RAMP = 10.0  # seconds over which the sockets are first opened
SETTLE = 40.0  # seconds after the churn: watchers, slots and lingering conversations go
HEX_ID = re.compile(r"[0-9a-f]{32}")
TABLES = ("conversations", "turns", "webhook_deliveries")
Counter = collections.Counter[str]
# Keys with no TTL that something owns and keeps bounded, and what.
OWNED = {
    "chat:workers": "one sorted set for all workers: each says it lives every second, removes "
    "itself when it stops; a dead one is removed by the worker that recovers its turns",
}


def expected_text(tokens: int, para: int) -> str:
    """What the fake streams for `bench tokens=N para=P` (see `behaviour_from_question`)."""
    return "".join(f"{TOKEN}\n\n" if para and (n + 1) % para == 0 else TOKEN for n in range(tokens))


class Failed(Exception):
    """A check of a reply failed; the message says which."""


@dataclass
class Socket:
    """A client's socket and the conversation it is joined to."""

    ws: ClientConnection
    conversation: str
    seq: int = 0  # the largest `seq` received
    gone: bool = False  # closed, by either side

    async def frame(self) -> dict[str, Any]:
        """The next frame of the conversation (those without `seq` are skipped, but errors)."""
        while True:
            got: dict[str, Any] = json.loads(await self.ws.recv())
            if "seq" not in got:
                if got["type"] == "error":
                    raise Failed(f"error {got.get('code')}")
                continue
            if got["seq"] <= self.seq:
                raise Failed("seq did not increase")
            self.seq = got["seq"]
            return got

    async def reply(self, until: int | None = None) -> tuple[str, str | None]:
        """The bot's text to its `end` and the end's status; with `until`, stop reading once
        that many characters came (status None if the end had not)."""
        got_text = ""
        while True:
            got = await self.frame()
            if got["type"] == "stream" and got["sender"] == "bot":
                got_text += got["message"]
            elif got["type"] == "error":
                raise Failed(f"error {got.get('code')}")
            elif got["type"] == "end":
                return got_text, got["status"]
            if until is not None and len(got_text) >= until:
                return got_text, None

    async def close(self, abort: bool = False) -> None:
        self.gone = True
        if abort:
            self.ws.transport.abort()
        await self.ws.close()


@dataclass
class Sample:
    at: float  # seconds since the churn began
    phase: str  # start, churn, settled
    rss: list[int]
    cpu: list[float]
    redis_memory: int
    keys: int
    keys_without_ttl: int
    rows: dict[str, int]
    database_bytes: int
    sockets: int
    questions: int


@dataclass
class Soak:
    workers: list[Worker]
    http: httpx.AsyncClient
    pause: float  # a client's mean pause between actions
    deadline: float
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    kept: dict[str, int] = field(default_factory=dict)  # conversation -> questions asked
    deleted: set[str] = field(default_factory=set)
    unused: set[str] = field(default_factory=set)
    sockets: int = 0
    questions: int = 0

    def worker(self) -> Worker:
        return random.choice(self.workers)

    async def open(self, conversation: str | None = None, after: int = 0) -> Socket:
        """A socket on a random worker: a new conversation, or a rejoin after `after`."""
        url = self.worker().ws
        if conversation is not None:
            url += f"?conversation={conversation}&after={after}"
        ws = await connect(url, compression=None, open_timeout=ACTION_WITHIN, max_size=None)
        self.sockets += 1
        hello: dict[str, Any] = json.loads(await ws.recv())
        if conversation is None:
            self.unused.add(hello["conversation"])
        return Socket(ws, hello["conversation"], after)

    async def closed(self, sock: Socket, abort: bool = False) -> None:
        if not sock.gone:
            self.sockets -= 1
        await sock.close(abort)

    async def ask(self, sock: Socket) -> str:
        """Ask a question of a random shape; the text the fake will stream for it."""
        tokens, para = random.randint(10, 40), random.choice((0, 3, 7))
        question = f"bench tokens={tokens} delay=0.02 para={para} n={self.questions}"
        await sock.ws.send(json.dumps({"type": "question", "message": question}))
        self.questions += 1
        self.unused.discard(sock.conversation)
        self.kept[sock.conversation] = self.kept.get(sock.conversation, 0) + 1
        return expected_text(tokens, para)

    async def complete(self, sock: Socket) -> Socket | None:
        expected = await self.ask(sock)
        got, status = await sock.reply()
        if status != "completed" or got != expected:
            raise Failed(f"complete: {status}, {len(got)} of {len(expected)} characters")
        return sock

    async def drop(self, sock: Socket) -> Socket | None:
        expected = await self.ask(sock)
        before, status = await sock.reply(random.randint(1, len(expected) - 1))
        if status is not None:  # it ended before the drop: nothing to rejoin
            self.outcomes["drop came after the end"] += 1
        else:
            await self.closed(sock, abort=random.random() < 0.5)
            sock = await self.open(sock.conversation, sock.seq)
            rest, status = await sock.reply()
            before += rest
        if status != "completed" or before != expected:
            raise Failed(f"drop: {status}, {len(before)} of {len(expected)} characters")
        return sock

    async def stop(self, sock: Socket) -> Socket | None:
        expected = await self.ask(sock)
        got, status = await sock.reply(random.randint(1, len(expected) - 5))
        if status is None:
            await sock.ws.send(json.dumps({"type": "stop"}))
            rest, status = await sock.reply()
            got += rest
        if status == "completed" and got == expected:
            self.outcomes["stop came after the end"] += 1
        elif status != "interrupted" or not expected.startswith(got):
            raise Failed(f"stop: {status}, {len(got)} characters not a prefix")
        return sock

    async def delete(self, sock: Socket) -> Socket | None:
        expected = await self.ask(sock)
        mid = random.random() < 0.5
        got, _ = await sock.reply(random.randint(1, len(expected) - 5) if mid else None)
        answer = await self.http.delete(
            f"{self.worker().http}/api/conversations/{sock.conversation}"
        )
        if answer.status_code != 204:
            raise Failed(f"delete: HTTP {answer.status_code}")
        del self.kept[sock.conversation]
        self.deleted.add(sock.conversation)
        code = None
        try:
            while True:
                got_frame = await sock.frame()
                if got_frame["type"] == "stream" and got_frame["sender"] == "bot":
                    got += got_frame["message"]
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd is not None else None
        await self.closed(sock)
        if code != 1008 or not expected.startswith(got):
            raise Failed(f"delete: closed with {code}, text a prefix: {expected.startswith(got)}")
        return None

    async def leave(self, sock: Socket) -> Socket | None:
        await self.closed(sock)
        return None

    async def side(self, sock: Socket) -> Socket | None:
        """Open a conversation on the side and leave it without a question."""
        other = await self.open()
        await self.closed(other)
        return sock

    async def client(self) -> None:
        """One virtual client's loop, until the deadline."""
        actions: dict[str, Callable[[Socket], Awaitable[Socket | None]]] = {
            "complete": self.complete,
            "drop": self.drop,
            "stop": self.stop,
            "delete": self.delete,
            "leave": self.leave,
            "unused": self.side,
        }
        names, weights = list(ACTIONS), list(ACTIONS.values())
        await asyncio.sleep(random.uniform(0, RAMP))
        sock: Socket | None = None
        while time.monotonic() < self.deadline:
            action = random.choices(names, weights)[0]
            try:
                if sock is None:
                    async with asyncio.timeout(ACTION_WITHIN):
                        sock = await self.open()
                await asyncio.sleep(random.uniform(0, 2 * self.pause))
                if time.monotonic() >= self.deadline:
                    break
                async with asyncio.timeout(ACTION_WITHIN):
                    sock = await actions[action](sock)
                self.outcomes[action] += 1
            except (Failed, TimeoutError, ConnectionClosed, OSError, httpx.HTTPError) as exc:
                self.errors[
                    f"{action}: {exc if isinstance(exc, Failed) else type(exc).__name__}"
                ] += 1
                if sock is not None:
                    await self.closed(sock, abort=True)
                sock = None
        if sock is not None:
            await self.closed(sock)


class Sampler:
    """What the workers, Redis and PostgreSQL hold, now."""

    def __init__(self, workers: list[Worker], shared: redis.Redis, database: AsyncEngine) -> None:
        self.pids = [w.process.pid for w in workers if w.process is not None]
        self.redis = shared
        self.database = database
        self.samples: list[Sample] = []

    async def rows(self) -> tuple[dict[str, int], int]:
        counts = ", ".join(f"(SELECT count(*) FROM {table})" for table in TABLES)
        async with self.database.connect() as db:
            row = (
                await db.execute(text(f"SELECT {counts}, pg_database_size(current_database())"))
            ).one()
        return dict(zip(TABLES, row[:-1], strict=True)), int(row[-1])

    async def take(self, soak: Soak, phase: str, began: float) -> Sample:
        memory = await self.redis.info("memory")
        space = await self.redis.info("keyspace")
        db0 = cast(dict[str, int], space.get("db0", {"keys": 0, "expires": 0}))
        rows, size = await self.rows()
        sample = Sample(
            at=time.monotonic() - began,
            phase=phase,
            rss=[rss_bytes(pid) for pid in self.pids],
            cpu=[cpu_seconds(pid) for pid in self.pids],
            redis_memory=int(memory["used_memory"]),
            keys=db0["keys"],
            keys_without_ttl=db0["keys"] - db0["expires"],
            rows=rows,
            database_bytes=size,
            sockets=soak.sockets,
            questions=soak.questions,
        )
        self.samples.append(sample)
        print(
            f"  {sample.at:6.0f} s {phase:8} RSS {' / '.join(mb(r) for r in sample.rss)}, "
            f"Redis {mb(sample.redis_memory)} {sample.keys} keys ({sample.keys_without_ttl} "
            f"without TTL), rows {rows}, {sample.sockets} sockets, {sample.questions} questions, "
            f"{sum(soak.errors.values())} errors {dict(soak.errors.most_common(3))}",
            flush=True,
        )
        return sample


async def deleted_ones(soak: Soak, shared: redis.Redis, database: AsyncEngine) -> str:
    """What is left of the deleted conversations: rows, Redis keys, and whether a client can
    join one whose keys are left (it must be refused with 1008)."""
    deleted = sorted(soak.deleted)
    async with database.connect() as db:
        rows = (
            await db.execute(
                text("SELECT count(*) FROM conversations WHERE id = ANY(:ids)"), {"ids": deleted}
            )
        ).scalar_one()
    pipe = shared.pipeline(transaction=False)
    for conversation in deleted:
        pipe.exists(
            *(f"chat:{{{conversation}}}:{part}" for part in ("frames", "seq", "owner", "assistant"))
        )
    with_keys = [c for c, n in zip(deleted, await pipe.execute(), strict=True) if n]
    joined = 0
    for conversation in with_keys[:10]:
        try:
            async with connect(
                f"{soak.worker().ws}?conversation={conversation}", compression=None
            ) as ws:
                await ws.recv()
                joined += 1
        except ConnectionClosed:
            pass
    return (
        f"deleted conversations: {len(deleted):,}; rows left {rows}; with Redis keys left "
        f"{len(with_keys):,}; of {min(10, len(with_keys))} of those joined, {joined} accepted"
    )


def span(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def mb(value: float) -> str:
    return f"{value / 2**20:.1f} MB"


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares change per second of (seconds, value) points."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def key_pattern(key: str, workers: set[str]) -> tuple[str, str | None]:
    """A key with its ids replaced by `ID` / `WORKER`, and the conversation it is about."""
    tag = key.partition("{")[2].partition("}")[0]
    if tag in workers:
        return key.replace(tag, "WORKER"), None
    if HEX_ID.fullmatch(tag):
        return key.replace(tag, "ID"), tag
    for worker in workers:
        key = key.replace(worker, "WORKER")
    return re.sub(r"\d+(\.\d+){3}", "ADDRESS", key), None


async def audit(shared: redis.Redis, soak: Soak) -> list[str]:
    """Every key by pattern and by what its conversation became: count, TTLs, sizes."""
    workers = {str(w) for w in await shared.zrange("chat:workers", 0, -1)}
    keys = [str(k) async for k in shared.scan_iter(count=1000)]
    groups: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        pipe = shared.pipeline(transaction=False)
        for key in batch:
            pipe.ttl(key)
            pipe.memory_usage(key)
        answers = await pipe.execute()
        for n, key in enumerate(batch):
            if answers[2 * n] == -2:  # gone since the scan
                continue
            pattern, conversation = key_pattern(key, workers)
            state = "-"
            if conversation is not None:
                state = (
                    "deleted"
                    if conversation in soak.deleted
                    else "kept"
                    if conversation in soak.kept
                    else "never asked in"
                    if conversation in soak.unused
                    else "unknown"
                )
            groups[pattern, state].append((int(answers[2 * n]), int(answers[2 * n + 1] or 0)))
    lines = [
        "| key | conversation | keys | TTL left | without TTL | bytes (MEMORY USAGE) |",
        "|---|---|---|---|---|---|",
    ]
    for (pattern, state), found in sorted(groups.items()):
        ttls = [ttl for ttl, _ in found if ttl >= 0]
        left = f"{span(min(ttls))} to {span(max(ttls))}" if ttls else "-"
        bare = sum(1 for ttl, _ in found if ttl == -1)
        lines.append(
            f"| `{pattern}` | {state} | {len(found):,} | {left} | {bare} | "
            f"{sum(size for _, size in found):,} |"
        )
        if bare:
            owner = OWNED.get(pattern, "**no TTL and no owner**")
            lines.append(f"| ↳ without TTL: {owner} | | | | {bare} | |")
    return lines


def report(sampler: Sampler, soak: Soak, audit_lines: list[str], receiver: Counter) -> None:
    samples = sampler.samples
    churn = [s for s in samples if s.phase == "churn"]
    warm = [s for s in churn if s.at >= churn[-1].at / 4] if churn else []
    start, end, settled = samples[0], churn[-1] if churn else samples[-1], samples[-1]
    first = churn[0] if churn else start
    count: Callable[[float], str] = "{:,.0f}".format
    measures: list[tuple[str, list[float], Callable[[float], str]]] = [
        (f"RSS, worker {n + 1}", [s.rss[n] for s in samples], mb) for n in range(len(start.rss))
    ]
    measures += [
        ("Redis used_memory", [s.redis_memory for s in samples], mb),
        ("Redis keys", [s.keys for s in samples], count),
        ("Redis keys without TTL", [s.keys_without_ttl for s in samples], count),
        *((f"PostgreSQL {t} rows", [float(s.rows[t]) for s in samples], count) for t in TABLES),
        ("PostgreSQL database size", [s.database_bytes for s in samples], mb),
    ]
    at = {id(s): n for n, s in enumerate(samples)}
    print()
    print(
        f"| measure | start | first sample ({first.at:.0f} s) | end of churn ({end.at:.0f} s) "
        "| settled | trend, last 3/4 of the churn |"
    )
    print("|---|---|---|---|---|---|")
    for name, values, shown in measures:
        per_minute = slope([(s.at, values[at[id(s)]]) for s in warm]) * 60
        cells = (shown(values[at[id(s)]]) for s in (start, first, end, settled))
        print(f"| {name} | {' | '.join(cells)} | {shown(per_minute)} a minute |")
    cpu = [b - a for a, b in zip(start.cpu, end.cpu, strict=True)]
    print()
    print(
        f"{soak.questions:,} questions, {len(soak.kept) + len(soak.deleted):,} conversations "
        f"asked in ({len(soak.deleted):,} deleted, {len(soak.kept):,} kept), "
        f"{len(soak.unused):,} never asked in; worker CPU "
        f"{' + '.join(f'{c:.0f}' for c in cpu)} s, "
        f"{sum(cpu) / max(1, soak.questions) * 1e3:.1f} ms a question"
    )
    print(f"outcomes: {dict(soak.outcomes)}")
    print(f"errors: {dict(soak.errors) or 'none'}")
    print(
        f"PostgreSQL against the clients: conversations {settled.rows['conversations']:,} "
        f"(kept {len(soak.kept):,}), turns {settled.rows['turns']:,} "
        f"(questions in kept conversations {sum(soak.kept.values()):,}), webhook deliveries "
        f"{settled.rows['webhook_deliveries']:,} (received {sum(receiver.values()):,}: "
        f"{dict(receiver)})"
    )
    print()
    print("Redis keys after the soak:")
    print("\n".join(audit_lines))


async def run(
    args: argparse.Namespace,
    workers: list[Worker],
    receiver: Receiver,
    redis_url: str,
    database_url: str,
) -> None:
    shared = redis.Redis.from_url(redis_url, decode_responses=True)
    database = create_async_engine(database_url)
    sampler = Sampler(workers, shared, database)
    received: Counter = collections.Counter()

    def drain_receiver() -> None:
        received.update(str(event["type"]) for _, event in receiver.arrivals)
        receiver.arrivals.clear()

    async with httpx.AsyncClient(timeout=ACTION_WITHIN) as http:
        duration = args.minutes * 60
        every = args.every or max(5.0, duration / 12)
        began = time.monotonic()
        soak = Soak(workers, http, args.sockets / RATE, began + duration)
        print(
            f"soak: {args.sockets} sockets over {len(workers)} workers for {args.minutes:g} min, "
            f"a pause of {soak.pause:.0f} s on average between a client's actions; "
            f"a sample every {every:.0f} s",
            flush=True,
        )
        await sampler.take(soak, "start", began)
        clients = [asyncio.create_task(soak.client()) for _ in range(args.sockets)]
        try:
            while time.monotonic() < soak.deadline:
                await asyncio.sleep(min(every, max(0.0, soak.deadline - time.monotonic())))
                drain_receiver()
                await sampler.take(soak, "churn", began)
            await asyncio.gather(*clients)
        finally:  # cut short: the clients go before the client they share closes
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        await asyncio.sleep(SETTLE)
        drain_receiver()
        await sampler.take(soak, "settled", began)
        lines = await audit(shared, soak)
        report(sampler, soak, lines, received)
        print(await deleted_ones(soak, shared, database))
    await shared.aclose()
    await database.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="1,000 sockets for 10 minutes")
    parser.add_argument("--minutes", type=float, help="how long the churn lasts")
    parser.add_argument("--sockets", type=int, help="virtual clients, a socket each")
    parser.add_argument("--every", type=float, help="seconds between samples")
    parser.add_argument("--logs", type=Path, help="keep the workers' logs in this folder")
    args = parser.parse_args()
    args.minutes = args.minutes or (10.0 if args.full else 1.0)
    args.sockets = args.sockets or (1000 if args.full else 200)
    raise_open_files(args.sockets * 4 + 1024)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> None:
    receiver = await Receiver().start()
    hook = {
        "name": "soak",
        "url": f"http://127.0.0.1:{receiver.port}/",
        "secret": SECRET,
        "every_conversation": True,
    }
    postgres, shared = Postgres(), Redis()
    try:
        postgres.start()
        shared.start()
        database = postgres.database()
        with tempfile.TemporaryDirectory() as scratch, fake_model() as upstream:
            folder: Path = args.logs or Path(scratch)
            env = server_env(
                upstream,
                CHAT_DATABASE_URL=database,
                CHAT_REDIS_URL=shared.url,
                CHAT_WEBHOOKS=json.dumps([hook]),
                CHAT_QUOTA_QUESTIONS="1000000/minute",
                CHAT_QUOTA_TOKENS="1000000000/day",
                CHAT_QUOTA_REPLIES="1000000",
                CHAT_QUOTA_CONNECTIONS="1000000",
            )
            workers = [Worker(env, folder / f"worker-{n}.log", f"worker {n}") for n in (1, 2)]
            for worker in workers:
                worker.start()
            try:
                await run(args, workers, receiver, shared.url, database)
            finally:
                stopping = datetime.now()
                for worker in workers:
                    worker.terminate()
                log_summary(folder, stopping)
    finally:
        await receiver.close()
        postgres.remove()
        shared.remove()


def log_summary(folder: Path, stopping: datetime) -> None:
    """The workers' warnings and errors, by message (with what a traceback or a pending task
    adds on the lines after), and whether they came while the workers were being stopped."""
    said: Counter = collections.Counter()
    for log in sorted(folder.glob("worker-*.log")):
        record: list[str] = []
        for line in [*log.read_text(errors="replace").splitlines(), "0000-00-00 end"]:
            if not re.match(r"\d{4}-\d\d-\d\d ", line):
                if record:  # a warning's or an error's own
                    record.append(line)
                continue
            if record:
                said[summary(record)] += 1
            found = re.search(r" (WARNING|ERROR|CRITICAL) (\S+?):(?: \[[^]]*\])? (.*)", line)
            record = []
            if found:
                # The log's own time format, which sorts as text.
                late = line[:19] >= stopping.strftime("%Y-%m-%d %H:%M:%S")
                when = " [while stopping]" if late else ""
                record = [f"{found[1]}{when} {found[2]}: {HEX_ID.sub('ID', found[3])[:120]}"]
    print()
    print("worker log, warnings and errors: " + ("none" if not said else ""))
    for message, count in said.most_common(20):
        print(f"  {count:6}  {message}")


def summary(record: list[str]) -> str:
    """A log record's first line, and the task or exception its other lines name."""
    rest = record[1:]
    task = next((re.search(r"coro=<([^ >]+)", line) for line in rest if "coro=<" in line), None)
    if task is not None:
        return f"{record[0]} ({task[1]})"
    return f"{record[0]} ({rest[-1].strip()[:120]})" if rest else record[0]


if __name__ == "__main__":
    main()
