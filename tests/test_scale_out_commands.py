"""The two commands that scale out: `python -m backend --workers N` (one port, N processes)
and `python -m deploy.local` (the README's recipe: nginx, workers, Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from backend.process.server import free_port
from deploy.services import Postgres, Redis, children, environment_without_settings
from fakes.openai_server import Behaviour, FakeUpstream
from tests.harness import (
    UNIT,
    Frame,
    alive,
    backend_process,
    connect,
    conversation_of,
    healthy,
    python_process,
    recv,
    text_of,
    until_end,
    until_reply_text,
    wait_gone,
)

SCALE_OUT = ("OPENAI_BASE_URL", "CHAT_MODEL", "CHAT_DATABASE_URL", "CHAT_REDIS_URL")


async def test_workers_share_one_port_and_a_dead_one_is_replaced(
    fake: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> None:
    port = free_port()
    env = dict(
        zip(SCALE_OUT, (fake.url, "fake-model", postgres.database(), redis_server.url), strict=True)
    )
    async with backend_process(port, "--workers", "2", **env) as parent:
        base = f"http://127.0.0.1:{port}"
        await healthy(base)
        workers = children(parent.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        async with asyncio.timeout(UNIT * 5):
            while len(replaced := children(parent.pid)) < 2 or workers[0] in replaced:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await healthy(base)
        # One conversation over several sockets, each accepted by whichever process is free.
        async with connect(f"ws://127.0.0.1:{port}/chat") as ws:
            conversation = conversation_of(ws)
            await ws.send("one")
            assert (await until_end(ws))[-1]["status"] == "completed"
        for _ in range(4):
            url = f"ws://127.0.0.1:{port}/chat?conversation={conversation}"
            async with ws_connect(url) as ws:
                assert (await recv(ws))["conversation"] == conversation
                assert text_of(await until_end(ws)) == "You said: one"
        parent.send_signal(signal.SIGTERM)
        async with asyncio.timeout(UNIT * 10):
            assert await parent.wait() == 0
        for worker in replaced:
            await wait_gone(worker)


async def test_several_workers_need_redis_and_a_shared_database(fake: FakeUpstream) -> None:
    env = environment_without_settings()
    env["OPENAI_BASE_URL"] = fake.url
    async with python_process(
        "-m",
        "backend",
        "--workers",
        "2",
        "--port",
        str(free_port()),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    ) as process:
        _, said = await asyncio.wait_for(process.communicate(), UNIT * 10)
    assert process.returncode == 2
    assert "set CHAT_REDIS_URL" in said.decode()


class Recipe:
    """What `python -m deploy.local` printed: the proxy's URL, each worker's pid and URL, and
    PostgreSQL's and Redis's ports; `line()` reads what it prints next."""

    def __init__(self, lines: list[str], process: asyncio.subprocess.Process) -> None:
        self.url = re.search(r"Chat at (http://\S+?)/? ", lines[0])[1]  # type: ignore[index]
        self.workers = [
            (int(match[1]), match[2])
            for line in lines
            if (match := re.match(r"worker \d+: pid (\d+), (http://\S+)", line))
        ]
        self.ports = [
            int(match[1])
            for line in lines
            if (match := re.match(r"(?:PostgreSQL|Redis): \S+127\.0\.0\.1:(\d+)/", line))
        ]
        self.process = process

    async def line(self) -> str:
        assert self.process.stdout is not None
        line = (await self.process.stdout.readline()).decode()
        assert line, "deploy.local exited"
        return line.strip()

    @staticmethod
    def ws(http: str) -> str:
        return http.replace("http://", "ws://") + "/chat"


def recipe_env(fake: FakeUpstream) -> dict[str, str]:
    """The environment `python -m deploy.local` runs in: the fake model, no other settings."""
    env = environment_without_settings()
    env.update(OPENAI_BASE_URL=fake.url, CHAT_MODEL="fake-model", CHAT_TIMEOUT="3")
    return env


@asynccontextmanager
async def recipe(fake: FakeUpstream, data: Path) -> AsyncIterator[Recipe]:
    """`python -m deploy.local` with two workers on the fake model, until the block ends; then
    Ctrl-C, as a terminal sends it: SIGINT to the command's whole process group."""
    async with python_process(
        "-m",
        "deploy.local",
        "--port",
        str(free_port()),
        "--data",
        str(data),
        env=recipe_env(fake),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    ) as process:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(60):
            while not lines or not lines[-1].startswith("logs:"):
                line = (await process.stdout.readline()).decode()
                assert line, f"deploy.local exited: {lines}"
                lines.append(line.strip())
        try:
            yield Recipe(lines, process)
        finally:
            os.killpg(process.pid, signal.SIGINT)
            async with asyncio.timeout(UNIT * 15):
                assert await process.wait() == 0


@pytest.fixture
def recipe_data() -> Iterator[Path]:
    """A folder for the recipe's state that PostgreSQL's unprivileged user can reach."""
    data = Path(tempfile.mkdtemp(prefix="chat-recipe-"))
    data.chmod(0o755)
    yield data
    shutil.rmtree(data, ignore_errors=True)


async def test_the_recipe_survives_kill_9_of_the_worker_streaming(
    fake: FakeUpstream, recipe_data: Path
) -> None:
    data = recipe_data
    fake.then(Behaviour(tokens=[" z"] * 5000, delay=0.005))
    async with recipe(fake, data) as deployed:
        (runner_pid, runner), _ = deployed.workers
        async with connect(Recipe.ws(runner)) as asker:
            conversation = conversation_of(asker)
            await asker.send("go on")
            await until_reply_text(asker)
        # Watch through the proxy (on either worker), then kill the one writing the reply.
        seen: list[Frame] = []
        url = f"{Recipe.ws(deployed.url)}?conversation={conversation}"
        async with ws_connect(url) as ws:
            await recv(ws)
            while len(text_of(seen)) < 20:
                seen.append(await recv(ws))
            os.kill(runner_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            try:
                seen += await until_end(ws, within=UNIT * 5)
            except ConnectionClosed:  # it was on the killed worker: rejoin, as clients do
                after = max(f["seq"] for f in seen)
                async with ws_connect(f"{url}&after={after}") as again:
                    await recv(again)
                    seen += await until_end(again, within=UNIT * 5)
        assert time.monotonic() - killed_at < 5
        assert [f["code"] for f in seen if f["type"] == "error"] == ["upstream_dropped"]
        assert seen[-1]["status"] == "error"
        async with connect(Recipe.ws(deployed.url)) as ws:
            await ws.send("and now?")
            assert (await until_end(ws))[-1]["status"] == "completed"
        async with httpx.AsyncClient(timeout=UNIT) as client:
            stored = (await client.get(f"{deployed.url}/api/conversations/{conversation}")).json()
        assert stored["messages"][1]["status"] == "error"
        assert stored["messages"][1]["text"] == text_of(seen)
    for pid, _ in deployed.workers:
        assert not alive(pid)


def worker_logs(data: Path) -> list[str]:
    """What the recipe's workers wrote to their logs."""
    return [log.read_text() for log in sorted(data.glob("*/worker-*.log"))]


def refused(port: int) -> bool:
    """Whether nothing listens on loopback `port`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=UNIT).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_ctrl_c_stops_the_recipe_quietly(fake: FakeUpstream, recipe_data: Path) -> None:
    async with recipe(fake, recipe_data) as deployed, connect(Recipe.ws(deployed.url)) as ws:
        await ws.send("hello")
        assert (await until_end(ws))[-1]["status"] == "completed"
    for pid, _ in deployed.workers:
        assert not alive(pid)
    assert len(deployed.ports) == 2
    for port in (int(deployed.url.rsplit(":", 1)[1]), *deployed.ports):
        assert refused(port)
    logs = worker_logs(recipe_data)
    assert len(logs) == 2
    for said in logs:
        assert "Traceback" not in said, said
        assert "KeyboardInterrupt" not in said, said


async def test_ctrl_c_drains_the_clients_behind_nginx(
    fake: FakeUpstream, recipe_data: Path
) -> None:
    frames: list[dict[str, object]] = []

    async def until_closed(ws: ClientConnection) -> tuple[int, str] | None:
        """The close code and reason the server sent; None if the connection was cut."""
        received = None
        try:
            while True:
                frames.append(json.loads(await ws.recv()))
        except ConnectionClosed as closed:
            received = closed.rcvd
        return None if received is None else (received.code, received.reason)

    fake.then(Behaviour(tokens=["word "] * 30, delay=0.05))
    async with recipe(fake, recipe_data) as deployed:
        ws = await ws_connect(Recipe.ws(deployed.url))
        await ws.send("a reply that the stop finds in flight")
        await until_reply_text(ws)
        closing = asyncio.create_task(until_closed(ws))
    closed = await asyncio.wait_for(closing, UNIT * 5)
    assert closed is not None, "cut off, not drained"
    assert closed[0] == 1012, closed
    ends = [frame for frame in frames if frame["type"] == "end"]
    assert [end["status"] for end in ends] == ["completed"]


async def test_the_recipe_starts_a_killed_worker_again(
    fake: FakeUpstream, recipe_data: Path
) -> None:
    async with recipe(fake, recipe_data) as deployed:
        (killed, url), _ = deployed.workers
        os.kill(killed, signal.SIGKILL)
        async with asyncio.timeout(UNIT * 5):
            said = await deployed.line()
            again = await deployed.line()
        assert said.startswith(f"worker 1 (pid {killed}) exited with code -9; starting it again")
        match = re.fullmatch(r"worker 1: pid (\d+), (http://\S+)", again)
        assert match is not None, again
        replacement = int(match[1])
        assert replacement != killed
        assert match[2] == url  # on its port: nginx's list of workers stays right
        await healthy(url)
        async with connect(Recipe.ws(url)) as ws:
            await ws.send("back?")
            assert (await until_end(ws))[-1]["status"] == "completed"
    assert not alive(replacement)


def started_worker(parent: int) -> int | None:
    """The pid of a `python -m backend` child of `parent`, once it runs."""
    for pid in children(parent):
        try:
            if b"-m\0backend\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except FileNotFoundError:
            pass
    return None


async def test_the_recipe_names_the_worker_that_does_not_come_up(
    fake: FakeUpstream, recipe_data: Path
) -> None:
    within = UNIT * 2
    async with python_process(
        "-m",
        "deploy.local",
        "--workers",
        "1",
        "--port",
        str(free_port()),
        "--data",
        str(recipe_data),
        "--start-timeout",
        f"{within:g}",
        env=recipe_env(fake),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    ) as process:
        # Freeze the worker as it starts, as a machine too loaded to run it would.
        async with asyncio.timeout(60):
            while (worker := started_worker(process.pid)) is None:
                assert process.returncode is None, "deploy.local exited"
                await asyncio.sleep(0.01)
        os.kill(worker, signal.SIGSTOP)
        async with asyncio.timeout(within + UNIT * 10):
            _, err = await process.communicate()
    log = recipe_data / "nginx" / "worker-1.log"
    assert re.fullmatch(
        rf"python -m deploy.local: worker 1 \(http://127\.0\.0\.1:\d+\) did not answer "
        rf"/healthz within {within:g} s; its log: {re.escape(str(log))}\n",
        err.decode(),
    ), err.decode()
    assert process.returncode == 1
    await wait_gone(worker)
