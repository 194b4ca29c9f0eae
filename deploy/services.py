"""PostgreSQL, Redis, nginx and chat workers as child processes on loopback ports: Debian's
binaries, each in a folder of its own (a temporary one unless told), run as an unprivileged
user when we are root (PostgreSQL refuses to run as root). `python -m deploy.local` and the
tests bring up deployments with these."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from backend.process.server import free_port
from backend.process.supervisor import signal_group
from deploy.render import render

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
UNPRIVILEGED = "nobody"
# Seconds a service may take to come up: generous, since a loaded machine starts slowly.
START_WITHIN = 60.0


def as_unprivileged(command: list[str]) -> list[str]:
    """`command`, run as an unprivileged user when the tests run as root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", UNPRIVILEGED, "--", *command]


def see_log(log: Path | None) -> str:
    """Where to read what a process said, for the end of an error message."""
    return f"; its log: {log}" if log is not None else ""


def wait_listening(
    port: int,
    process: subprocess.Popen[bytes],
    within: float = START_WITHIN,
    name: str = "the server",
    log: Path | None = None,
) -> None:
    """Return once something accepts connections on `port`; fail, naming `name` and its `log`,
    if `process` exits first or `within` seconds pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} (port {port}) exited with code {process.returncode} before accepting "
                f"connections{see_log(log)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(
        f"{name} (port {port}) did not accept connections within {within:g} s{see_log(log)}"
    )


class Addressed:
    """The URLs of a server listening on a loopback port."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/chat"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


# The prefixes of the server's own settings in the environment.
SETTINGS_PREFIXES = ("OPENAI_", "CHAT_")


def environment_without_settings() -> dict[str, str]:
    """Our environment minus the server's settings, so a child gets only those it is given."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}


def group_exits(process: subprocess.Popen[bytes], within: float) -> bool:
    """Wait until every process of `process`'s group has exited; False after `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            process.wait()
            return True
        time.sleep(0.01)
    return False


class Service:
    """One server process in a folder of its own (temporary by default), owned by the
    unprivileged user when the service runs as that user."""

    unprivileged = True
    stop_signal = signal.SIGTERM
    start_within = START_WITHIN  # seconds until it must accept connections

    def __init__(self, name: str, folder: Path | None = None, port: int = 0) -> None:
        self.name = name
        if folder is None:
            folder = Path(tempfile.mkdtemp(prefix=f"chat-{name}-"))
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder.resolve()
        if os.geteuid() == 0 and self.unprivileged:
            shutil.chown(self.folder, UNPRIVILEGED)
            reachable = subprocess.run(as_unprivileged(["test", "-w", str(self.folder)]))
            if reachable.returncode != 0:
                raise RuntimeError(
                    f"{name} runs as '{UNPRIVILEGED}', who cannot reach {self.folder}; "
                    "choose a folder every user can reach (under /var/tmp, say)."
                )
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment, if not ours."""
        return None

    def start(self) -> None:
        """Start (or start again, on the same port and data)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                as_unprivileged(self.command()) if self.unprivileged else self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_listening(self.port, self.process, self.start_within, self.name, self.log)

    def stop(self) -> None:
        """Stop the server and wait for it; its data stays until `remove`."""
        if self.process is not None and self.process.poll() is None:
            # To the whole group: `runuser` does not pass every signal on to the server.
            signal_group(self.process.pid, self.stop_signal)
            if not group_exits(self.process, 10.0):
                signal_group(self.process.pid, signal.SIGKILL)
                group_exits(self.process, 10.0)
        self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Postgres(Service):
    """A PostgreSQL cluster of its own (made on first use); `database()` gives URLs for
    SQLAlchemy. `durable=False` trades crash safety for speed, for data that may be lost."""

    # Fast shutdown: SIGTERM would wait for every client (the workers' pools) to leave.
    stop_signal = signal.SIGINT

    def __init__(self, folder: Path | None = None, durable: bool = True) -> None:
        super().__init__("postgres", folder)
        self.durable = durable
        self.data = self.folder / "data"
        if (self.data / "PG_VERSION").exists():
            return
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
        command = [
            str(POSTGRES_BIN / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.folder),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        if not self.durable:
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):
                command += ["-c", setting]
        return command

    def database(self, name: str | None = None) -> str:
        """The URL of database `name` (a new, empty one unless it exists) in this cluster."""
        name = name or f"chat_{uuid.uuid4().hex[:12]}"
        createdb = [str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
        made = subprocess.run([*createdb, "-U", "chat", name], capture_output=True, text=True)
        if made.returncode != 0 and "already exists" not in made.stderr:
            raise RuntimeError(f"createdb {name} failed: {made.stderr.strip()}")
        return f"postgresql+asyncpg://chat@127.0.0.1:{self.port}/{name}"


# Logical databases a Redis started here has, each a keyspace of its own (see `fresh_url`).
DATABASES = 256


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
            "--databases",
            str(DATABASES),
        ]

    def __init__(self, folder: Path | None = None, port: int = 0) -> None:
        super().__init__("redis", folder, port)
        self._used = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def fresh_url(self) -> str:
        """The URL of a database of this Redis that no other `fresh_url` gave: a deployment
        of its own shares its Redis with no other, as it shares its PostgreSQL database."""
        self._used += 1
        if self._used >= DATABASES:
            raise RuntimeError(f"every one of the {DATABASES} Redis databases is in use")
        return f"redis://127.0.0.1:{self.port}/{self._used}"


def free_cluster_port() -> int:
    """A free port for a cluster node whose bus port (10,000 above it) is free too."""
    for _ in range(1000):
        port = random.randrange(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of ports for a Redis Cluster node")


class ClusterNode(Redis):
    """One node of a Redis Cluster: its own folder, port and `nodes.conf`."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, free_cluster_port())
        self.name = f"redis-{self.port}"

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.folder / "nodes.conf"),
            # Seconds, not the default 15, before the others take a silent primary for failed.
            "--cluster-node-timeout",
            "2000",
        ]


class RedisCluster:
    """A Redis Cluster of `primaries` primaries, each with `replicas` replicas, made with
    `redis-cli --cluster create`; `url` for `CHAT_REDIS_URL`."""

    def __init__(self, primaries: int = 3, replicas: int = 1, folder: Path | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="chat-redis-cluster-")).resolve()
        if os.geteuid() == 0:
            shutil.chown(self.folder, UNPRIVILEGED)
        self.replicas = replicas
        count = primaries * (1 + replicas)
        self.nodes = [ClusterNode(self.folder / f"node{i}") for i in range(count)]

    @property
    def url(self) -> str:
        """Every node, as the server takes a cluster: any one of them is enough to start."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        if not (self.nodes[0].folder / "created").exists():
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            replicas = ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            made = subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, *replicas],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if made.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout}{made.stderr}")
            (self.nodes[0].folder / "created").touch()
        self.wait_ok()

    def cli(self, node: ClusterNode, *command: str) -> str:
        """A command's answer from one node, as `redis-cli` prints it."""
        done = subprocess.run(
            ["redis-cli", "-p", str(node.port), *command],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()

    def wait_ok(self, within: float = START_WITHIN) -> None:
        """Return once every running node says the cluster is whole, and every running
        replica is connected to its primary."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node.process is not None]
            whole = all("cluster_state:ok" in self.cli(node, "cluster", "info") for node in running)
            roles = [self.cli(node, "info", "replication") for node in running]
            replicas = [role for role in roles if "role:slave" in role]
            linked = all("master_link_status:up" in role for role in replicas)
            everyone = len(running) == len(self.nodes)
            expected = len(self.nodes) * self.replicas // (1 + self.replicas) if everyone else 0
            if whole and linked and len(replicas) >= expected:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the Redis Cluster in {self.folder} did not come up whole")

    def primary_of(self, key: str) -> ClusterNode:
        """The node that serves `key` now."""
        slot = int(self.cli(self.nodes[0], "cluster", "keyslot", key))
        for line in self.cli(self.nodes[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for taken in fields[8:]:
                low, _, high = taken.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"no primary serves slot {slot}")

    def replica_of(self, primary: ClusterNode) -> ClusterNode:
        """A replica of `primary`."""
        for line in self.cli(
            primary, "cluster", "replicas", self.cli(primary, "cluster", "myid")
        ).splitlines():
            port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            return next(node for node in self.nodes if node.port == port)
        raise RuntimeError(f"the primary on port {primary.port} has no replica")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class Nginx(Service):
    """nginx with the deployment's own configuration (deploy/nginx.conf) in front of `workers`."""

    def __init__(self, workers: list[int], folder: Path | None = None, port: int = 0) -> None:
        super().__init__("nginx", folder, port)
        self.conf = self.folder / "nginx.conf"
        upstreams = [f"127.0.0.1:{port}" for port in workers]
        self.conf.write_text(render(f"127.0.0.1:{self.port}", str(self.folder), upstreams))

    def command(self) -> list[str]:
        return ["nginx", "-c", str(self.conf), "-e", str(self.folder / "error.log")]


class Worker(Addressed):
    """`python -m backend` as one worker of a deployment; its output goes to `log`, if given."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path | None = None,
        name: str = "the worker",
        start_within: float = START_WITHIN,
    ) -> None:
        self.port = free_port()
        self.env = env
        self.log = log
        self.name = name
        self.start_within = start_within
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process; `wait_ready` waits until it serves."""
        environment = {**environment_without_settings(), **self.env}
        output = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        try:
            # A session of its own: a terminal's Ctrl-C goes to whoever started the worker,
            # which stops it with SIGTERM (a drain), not to the worker as an interrupt.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "backend", "--port", str(self.port)],
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if not isinstance(output, int):
                output.close()

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_healthy(self.http, self.process, self.start_within, self.name, self.log)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def terminate(self, within: float = 30.0) -> None:
        """SIGTERM: drain, then exit; SIGKILL if it has not within `within` seconds."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(within)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_healthy(
    base: str,
    process: subprocess.Popen[bytes],
    within: float = START_WITHIN,
    name: str = "the worker",
    log: Path | None = None,
) -> None:
    """Return once `base`/healthz answers 200; fail, naming `name` and its `log`, if `process`
    exits first or `within` seconds pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} ({base}) exited with code {process.returncode} before answering "
                f"/healthz{see_log(log)}"
            )
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{name} ({base}) did not answer /healthz within {within:g} s{see_log(log)}")


class Deployment(Addressed):
    """nginx, round-robin, in front of workers that share one Redis and one PostgreSQL database:
    the deployment the README describes, on loopback ports."""

    def __init__(
        self,
        workers: int,
        env: dict[str, str],
        folder: Path | None = None,
        port: int = 0,
        start_within: float = START_WITHIN,
    ) -> None:
        self.workers = [
            Worker(
                env,
                folder / f"worker-{n}.log" if folder is not None else None,
                f"worker {n}",
                start_within,
            )
            for n in range(1, workers + 1)
        ]
        self.nginx = Nginx([worker.port for worker in self.workers], folder, port)
        self.nginx.start_within = start_within
        self.port = self.nginx.port

    def start(self) -> Deployment:
        """Start the workers, and nginx once they all answer; on failure, stop them all."""
        try:
            for worker in self.workers:
                worker.launch()
            for worker in self.workers:
                worker.wait_ready()
            self.nginx.start()
        except BaseException:
            # Nothing was served yet: no drain to wait for, and a hung worker would not drain.
            self.nginx.stop()
            for worker in self.workers:
                worker.kill()
            raise
        return self

    def stop(self) -> None:
        """Drain every worker at once, then stop nginx: the clients behind it see the drain
        (replies end, sockets close with 1012), not a proxy that vanished under them."""
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.workers:
            worker.terminate()
        self.nginx.stop()

    def remove(self) -> None:
        """Stop, and remove nginx's folder."""
        self.stop()
        self.nginx.remove()
