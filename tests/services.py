"""Real PostgreSQL, Redis and nginx for the tests: Debian's binaries, started on free loopback
ports in temporary folders, as an unprivileged user (PostgreSQL refuses to run as root), and
stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from backend.server import free_port
from deploy.render import render
from tests.harness import Addressed

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
UNPRIVILEGED = "nobody"


def as_unprivileged(command: list[str]) -> list[str]:
    """`command`, run as an unprivileged user when the tests run as root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", UNPRIVILEGED, "--", *command]


def wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    """Return once something accepts connections on `port`; fail if `process` died."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {within} s")


class Service:
    """One server process in a temporary folder owned by the unprivileged user."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"chat-{name}-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start (or start again, on the same port and data)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                as_unprivileged(self.command()),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_listening(self.port, self.process)

    def stop(self) -> None:
        """Stop the server and wait for it; its data stays until `remove`."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Postgres(Service):
    """A PostgreSQL cluster of its own; `url` is an asyncpg URL for SQLAlchemy."""

    def __init__(self) -> None:
        super().__init__("postgres")
        self.data = self.folder / "data"
        subprocess.run(
            as_unprivileged(
                [
                    str(POSTGRES_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "chat",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def command(self) -> list[str]:
        return [
            str(POSTGRES_BIN / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.folder),
            "-c",
            "listen_addresses=127.0.0.1",
            # Test data need not survive a power cut.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]

    def database(self) -> str:
        """The URL of a new, empty database in this cluster."""
        name = f"chat_{uuid.uuid4().hex[:12]}"
        createdb = [str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        subprocess.run([*createdb, "-U", "chat", name], check=True, capture_output=True)
        return f"postgresql+asyncpg://chat@127.0.0.1:{self.port}/{name}"


class Redis(Service):
    """A Redis server with no persistence; `url` for redis-py."""

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ]

    def __init__(self) -> None:
        super().__init__("redis")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Nginx(Service):
    """nginx with the deployment's own configuration (deploy/nginx.conf) in front of `workers`."""

    def __init__(self, workers: list[int]) -> None:
        super().__init__("nginx")
        self.conf = self.folder / "nginx.conf"
        upstreams = [f"127.0.0.1:{port}" for port in workers]
        self.conf.write_text(render(f"127.0.0.1:{self.port}", str(self.folder), upstreams))

    def command(self) -> list[str]:
        return ["nginx", "-c", str(self.conf), "-e", str(self.folder / "error.log")]


class Worker(Addressed):
    """`python -m backend` as one worker of a deployment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CHAT_"))
        }
        environment.update(self.env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backend", "--port", str(self.port)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_healthy(self.http, self.process)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> None:
        """SIGTERM: drain, then exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def wait_healthy(base: str, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    """Return once `base`/healthz answers 200."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{base} never became healthy")


class Deployment(Addressed):
    """nginx, round-robin, in front of workers that share one Redis and one PostgreSQL database:
    the deployment the README describes, on loopback ports."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = [Worker(env) for _ in range(workers)]
        self.nginx = Nginx([worker.port for worker in self.workers])
        self.port = self.nginx.port

    def start(self) -> Deployment:
        for worker in self.workers:
            worker.start()
        self.nginx.start()
        return self

    def stop(self) -> None:
        self.nginx.remove()
        for worker in self.workers:
            worker.terminate()
