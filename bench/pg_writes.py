"""What PostgreSQL writes while many replies stream across two workers, measured from
PostgreSQL itself: this checkout's workers and, with `--before`, another checkout's, in one run.

Starts the fake model answering with prose (`bench/sockets.py`), a PostgreSQL and, for each
checkout, a fresh database, a fresh Redis (`deploy/services.py`) and two workers on them; the
checkouts are then measured one after the other, each database dropped once measured (so that
vacuuming its dead rows adds nothing to the next one's WAL). 200 sockets, spread over the two
workers, each ask two questions in a row, each answered with 300 tokens at 20 tokens/s; every
reply's text is checked as it arrives, and again as it is stored. From the first question until
PostgreSQL's WAL stops growing after the last `end`, given per turn and per second of streaming
(first question sent → last `end` received):

- **write transactions**: transaction ids handed out (`pg_current_snapshot()`'s xmax); a
  transaction that only reads takes none;
- **transactions of any kind**: the database's `pg_stat_database` commits and rollbacks (a
  read may end either way), reads included;
- **rows**: rows inserted and updated (HOT ones among them) in `turns` and `conversations`,
  from `pg_stat_user_tables`;
- **WAL**: bytes (`pg_wal_lsn_diff` of `pg_current_wal_lsn()`), records and full-page images
  (`pg_stat_wal`), from just after a checkpoint, so each run has the same pages to write whole.

A backend's counts reach the statistics views when it flushes them, which an idle one puts off
for up to 10 s: they are read at the start once the workers have been idle that long, and at
the end once the workers have stopped (a backend flushes as it exits).

`python -m bench.pg_writes [--quick] [--before CHECKOUT]`
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from websockets.asyncio.client import connect

from backend.process.server import free_port
from bench.run import FAILURES, frame, process, server_env, wait_for_port
from bench.sockets import Checkout, prose_model, reply_tokens
from deploy.services import POSTGRES_BIN, Postgres, Redis

WORKERS = 2
QUESTIONS = 2  # asked in a row on each socket
DELAY = 0.05  # 20 tokens/s
# Seconds an idle backend may hold its statistics before flushing them (PGSTAT_IDLE_INTERVAL),
# and one more.
STATS_IDLE = 11.0
# Seconds without a WAL byte written after which the workers are taken to have stored it all:
# more than the write-behind's tick.
WAL_QUIET = 2.5


@dataclass(frozen=True)
class Load:
    streams: int
    tokens: int


@dataclass(frozen=True)
class Counters:
    """PostgreSQL's counts at one moment."""

    next_xid: int
    wal_position: int  # bytes since 0/0
    transactions: int = 0
    wal_records: int = 0
    full_pages: int = 0


@dataclass(frozen=True)
class Rows:
    """One table's counts from `pg_stat_user_tables`."""

    inserted: int
    updated: int
    hot: int

    def __sub__(self, other: Rows) -> Rows:
        return Rows(
            self.inserted - other.inserted, self.updated - other.updated, self.hot - other.hot
        )


TABLES = ("turns", "conversations")


@dataclass
class Measured:
    """One checkout's run."""

    turns: int = 0
    streaming: float = 0.0  # first question sent → last `end` received, seconds
    failures: int = 0  # replies that did not arrive whole and completed
    stored_wrong: int = 0  # turns missing from the store or stored other than they arrived
    write_transactions: int = 0
    transactions: int = 0
    wal_bytes: int = 0
    wal_records: int = 0
    full_pages: int = 0
    rows: dict[str, Rows] = field(default_factory=dict)


def accepting(postgres: Postgres, within: float = 60.0) -> None:
    """Return once PostgreSQL takes connections: it listens a moment before it does."""
    ready = [str(POSTGRES_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(postgres.port)]
    deadline = time.monotonic() + within
    while subprocess.run(ready).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL took no connections within {within:g} s")
        time.sleep(0.1)


def engine(postgres: Postgres, database: str) -> AsyncEngine:
    """An engine on `database` whose connections close as they are given back: none stays
    open to be counted against a database."""
    return create_async_engine(
        f"postgresql+asyncpg://chat@127.0.0.1:{postgres.port}/{database}",
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )


async def one_row(admin: AsyncEngine, query: str, **values: Any) -> Any:
    async with admin.connect() as connection:
        return (await connection.execute(text(query), values)).one()


async def positions(admin: AsyncEngine) -> Counters:
    """The next transaction id and the WAL's end, both exact at once."""
    xid, wal = await one_row(
        admin,
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    return Counters(xid, wal)


async def counters(admin: AsyncEngine, database: str) -> Counters:
    """`positions`, with the statistics flushed so far."""
    at = await positions(admin)
    transactions, records, full_pages = await one_row(
        admin,
        "SELECT d.xact_commit + d.xact_rollback, w.wal_records, w.wal_fpi "
        "FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = :name",
        name=database,
    )
    return Counters(at.next_xid, at.wal_position, transactions, records, full_pages)


async def table_rows(postgres: Postgres, database: str) -> dict[str, Rows]:
    """`TABLES`' row counts, read in `database` itself (the view shows only its own)."""
    inside = engine(postgres, database)
    try:
        async with inside.connect() as connection:
            found = await connection.execute(
                text(
                    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = ANY(:tables)"
                ),
                {"tables": list(TABLES)},
            )
            rows = {name: Rows(inserted, updated, hot) for name, inserted, updated, hot in found}
    finally:
        await inside.dispose()
    return {name: rows.get(name, Rows(0, 0, 0)) for name in TABLES}


async def stored_wrong(postgres: Postgres, database: str, expected: dict[str, list[str]]) -> int:
    """Turns of `expected` (each conversation's replies, in order) not stored completed with
    exactly that text."""
    inside = engine(postgres, database)
    try:
        async with inside.connect() as connection:
            found = await connection.execute(
                text("SELECT conversation_id, position, text, status FROM turns")
            )
            stored = {(row[0], row[1]): (row[2], row[3]) for row in found}
    finally:
        await inside.dispose()
    missed = 0
    for conversation, replies in expected.items():
        for position, reply in enumerate(replies):
            kept, status = stored.get((conversation, position), ("", "missing"))
            if (kept, status) != (reply, "completed"):
                missed += 1
                FAILURES[f"stored, turn {position + 1}: {status}, {wrong(kept, reply)}"] += 1
    return missed


async def wal_quiet(admin: AsyncEngine, within: float = 20.0) -> Counters:
    """The positions once no WAL has been written for `WAL_QUIET` seconds (or `within` passed)."""
    last = await positions(admin)
    quiet_since = deadline = time.monotonic()
    deadline += within
    while time.monotonic() < deadline and time.monotonic() - quiet_since < WAL_QUIET:
        await asyncio.sleep(0.25)
        now = await positions(admin)
        if now.wal_position != last.wal_position:
            quiet_since = time.monotonic()
        last = now
    return last


async def workers_gone(admin: AsyncEngine, database: str, within: float = 20.0) -> None:
    """Return once no backend serves `database` (each flushed its statistics as it exited)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        (count,) = await one_row(
            admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = :name", name=database
        )
        if count == 0:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"backends still serve {database} {within:g} s after the workers stopped")


def wrong(arrived: str, reply: str) -> str:
    """How a reply's text differs from what it should be."""
    if arrived == reply:
        return "text right"
    if not arrived:
        return "no text"
    if reply.startswith(arrived):
        return "text cut short"
    if arrived.startswith(reply):
        return "text too long"
    return "text differs"


async def conversations(urls: list[str], load: Load, out: Measured) -> dict[str, list[str]]:
    """`load.streams` sockets, spread over `urls`, each asking `QUESTIONS` paced prose questions
    in a row: each conversation's replies as they should be, by id."""
    expected: dict[str, list[str]] = {}

    async def one(n: int) -> None:
        try:
            async with connect(
                urls[n % len(urls)], compression=None, open_timeout=60, max_size=None
            ) as ws:
                conversation = str((await frame(ws))["conversation"])
                expected[conversation] = []
                for question in range(QUESTIONS):
                    start = (n * QUESTIONS + question) * load.tokens
                    reply = "".join(reply_tokens(load.tokens, start))
                    expected[conversation].append(reply)
                    await ws.send(f"prose tokens={load.tokens} from={start} delay={DELAY}")
                    parts = []
                    while True:
                        got = await asyncio.wait_for(frame(ws), 60)
                        if got["type"] == "stream" and got["sender"] == "bot":
                            parts.append(got["message"])
                        elif got["type"] == "error":
                            FAILURES[f"error frame: {got.get('code')}, {got.get('message')}"] += 1
                        elif got["type"] == "end":
                            break
                    arrived = "".join(parts)
                    if arrived != reply or got.get("status") != "completed":
                        out.failures += 1
                        FAILURES[
                            f"question {question + 1}: {got.get('status')}, {wrong(arrived, reply)}"
                        ] += 1
        except Exception as exc:
            out.failures += 1
            FAILURES[type(exc).__name__] += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(load.streams)))
    out.streaming = time.perf_counter() - started
    out.turns = load.streams * QUESTIONS
    return expected


@dataclass
class Deployment:
    """One checkout's workers, on a database and a Redis of their own."""

    checkout: Checkout
    database: str
    ports: list[int]
    parts: contextlib.ExitStack  # closed to stop the workers and remove the Redis

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/chat" for port in self.ports]


def deploy(checkout: Checkout, postgres: Postgres, upstream: str) -> Deployment:
    """Launch `WORKERS` workers of `checkout` on a fresh database and Redis; `listening` waits
    until they serve. They may start together: one at a time makes the tables."""
    with contextlib.ExitStack() as parts:
        redis = Redis()
        parts.callback(redis.remove)
        redis.start()
        url = postgres.database()
        env = server_env(upstream, CHAT_DATABASE_URL=url, CHAT_REDIS_URL=redis.url)
        ports = [free_port() for _ in range(WORKERS)]
        for port in ports:
            args = ["-m", "backend", "--port", str(port)]
            parts.enter_context(process(args, env, cwd=checkout.folder))
        return Deployment(checkout, url.rsplit("/", 1)[1], ports, parts.pop_all())


def listening(deployment: Deployment) -> None:
    for port in deployment.ports:
        wait_for_port(port, 120)


async def during(
    admin: AsyncEngine, deployment: Deployment, load: Load, out: Measured
) -> tuple[Counters, Counters, dict[str, list[str]]]:
    """The counts before the load (just after a checkpoint) and once the WAL is quiet after
    it, and what each conversation's replies should be."""
    async with admin.connect() as connection:
        await connection.execute(text("CHECKPOINT"))
    start = await counters(admin, deployment.database)
    expected = await conversations(deployment.urls, load, out)
    end = await wal_quiet(admin)
    await admin.dispose()
    return start, end, expected


async def after_stop(admin: AsyncEngine, database: str) -> Counters:
    """The counts once the workers' backends have gone, each flushing its statistics."""
    await workers_gone(admin, database)
    flushed = await counters(admin, database)
    await admin.dispose()
    return flushed


def measure(deployment: Deployment, postgres: Postgres, load: Load) -> Measured:
    """`load` on a deployment whose backends have flushed their start-up statistics; its
    workers are stopped once it is measured."""
    out = Measured()
    database = deployment.database
    admin = engine(postgres, "postgres")
    with deployment.parts:
        start_rows = asyncio.run(table_rows(postgres, database))
        start, end, expected = asyncio.run(during(admin, deployment, load, out))
    flushed = asyncio.run(after_stop(admin, database))
    out.write_transactions = end.next_xid - start.next_xid
    out.wal_bytes = end.wal_position - start.wal_position
    out.transactions = flushed.transactions - start.transactions
    out.wal_records = flushed.wal_records - start.wal_records
    out.full_pages = flushed.full_pages - start.full_pages
    end_rows = asyncio.run(table_rows(postgres, database))
    out.rows = {name: end_rows[name] - start_rows[name] for name in TABLES}
    out.stored_wrong = asyncio.run(stored_wrong(postgres, database, expected))
    # Gone, so that vacuuming its dead rows adds nothing to the next run's WAL.
    asyncio.run(drop(admin, database))
    return out


async def drop(admin: AsyncEngine, database: str) -> None:
    async with admin.connect() as connection:
        await connection.execute(text(f'DROP DATABASE "{database}" WITH (FORCE)'))
    await admin.dispose()


def count(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}" if value < 10 else f"{value:.1f}"


def rows_text(rows: Rows, per: float) -> str:
    return (
        f"{count((rows.inserted + rows.updated) / per)} "
        f"({count(rows.inserted / per)} ins, {count(rows.updated / per)} upd, "
        f"{count(rows.hot / per)} HOT)"
    )


def report(results: dict[str, Measured], load: Load) -> None:
    """Each checkout's figures as a Markdown table, with now / before when both ran."""
    names = list(results)
    figures: dict[str, list[tuple[str, float]]] = {}
    for name, got in results.items():
        second, turn = got.streaming, got.turns
        rows = {table: got.rows[table] for table in TABLES}
        written = {table: float(rows[table].inserted + rows[table].updated) for table in TABLES}
        figures[name] = [
            ("streaming, first question → last `end`, s", second),
            ("write transactions, per second", got.write_transactions / second),
            ("write transactions, per turn", got.write_transactions / turn),
            ("transactions of any kind, per second", got.transactions / second),
            ("`turns` rows written, per second", written["turns"] / second),
            ("`conversations` rows written, per second", written["conversations"] / second),
            ("rows written, both tables, per turn", sum(written.values()) / turn),
            ("WAL bytes, per second", got.wal_bytes / second),
            ("WAL bytes, per turn", got.wal_bytes / turn),
            ("WAL records, per turn", got.wal_records / turn),
            ("full-page images, per turn", got.full_pages / turn),
        ]
    print()
    print(
        f"{load.streams} streams x {QUESTIONS} questions x {load.tokens} tokens at "
        f"{1 / DELAY:.0f} tokens/s over {WORKERS} workers"
    )
    ratio = len(names) == 2
    print("| measure | " + " | ".join(names) + (" | now / before |" if ratio else " |"))
    print("|---" * (len(names) + 1 + ratio) + "|")
    for index, (label, _) in enumerate(figures[names[-1]]):
        values = [figures[name][index][1] for name in names]
        cells = [count(value) for value in values]
        if ratio:
            cells.append(f"{values[1] / values[0]:.3f}" if values[0] else "—")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for table in TABLES:
        cells = [rows_text(results[name].rows[table], results[name].streaming) for name in names]
        cells += [""] * ratio
        print(f"| `{table}` per second: ins / upd (HOT) | " + " | ".join(cells) + " |")
    checks = [f"{got.failures} / {got.stored_wrong}" for got in results.values()] + [""] * ratio
    print("| replies wrong or failed / turns stored wrong | " + " | ".join(checks) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="50 streams of 100 tokens instead of 200 of 300"
    )
    parser.add_argument(
        "--before", metavar="CHECKOUT", help="also measure the workers of this checkout"
    )
    args = parser.parse_args()
    load = Load(50, 100) if args.quick else Load(200, 300)
    checkouts = ([Checkout("before", args.before)] if args.before else []) + [Checkout("now")]
    results: dict[str, Measured] = {}
    postgres = Postgres()
    try:
        postgres.start()
        accepting(postgres)
        with prose_model() as upstream, contextlib.ExitStack() as running:
            deployments = []
            for checkout in checkouts:
                deployments.append(deploy(checkout, postgres, upstream))
                running.push(deployments[-1].parts)
            for deployment in deployments:
                listening(deployment)
            time.sleep(STATS_IDLE)  # every backend's start-up counts flushed
            for deployment in deployments:
                got = measure(deployment, postgres, load)
                checkout = deployment.checkout
                results[checkout.name] = got
                print(
                    f"{checkout.name}: {got.turns} turns in {got.streaming:.1f} s, "
                    f"{got.write_transactions} write transactions, {got.transactions} in all, "
                    f"{got.wal_bytes:,} WAL bytes; rows inserted / updated (HOT): "
                    + ", ".join(
                        f"{table} {rows.inserted} / {rows.updated} ({rows.hot})"
                        for table, rows in got.rows.items()
                    )
                    + f"; replies wrong or failed {got.failures}, turns stored wrong "
                    f"{got.stored_wrong}",
                    flush=True,
                )
                if FAILURES:
                    print(f"  what was wrong: {dict(FAILURES)}", flush=True)
                    FAILURES.clear()
    finally:
        postgres.remove()
    report(results, load)


if __name__ == "__main__":
    main()
