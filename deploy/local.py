"""`python -m deploy.local [--workers N] [--port P] [--data DIR] [--start-timeout SECONDS]`: a
scaled-out chat server on this machine, nginx in front of N workers (2 by default) on Redis and
PostgreSQL.

Debian's `nginx`, `redis-server` and `postgresql` must be installed (`make test-deps` does it).
The model is the one the environment names (OPENAI_BASE_URL or OPENAI_API_KEY), or else the
embedded model, started once for all workers. Conversations are kept in DIR (default
data/deploy) across runs. Each service must come up within SECONDS (default 60; the embedded
model gets at least 120), or everything stops and the one that did not is named, with its log.
A worker that exits is started again, as `python -m backend --workers N` does. Ctrl-C (or
SIGTERM) stops everything, draining the workers.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from backend.config.settings import LOCAL_TEMPERATURE, Settings
from backend.model.embedded import (
    DEFAULT_REPLY_TOKENS,
    child_environment,
    model_path_problem,
    server_command,
)
from backend.process.server import free_port
from backend.process.supervisor import RestartPolicy
from deploy.services import (
    SETTINGS_PREFIXES,
    START_WITHIN,
    Deployment,
    Postgres,
    Redis,
    Service,
    Worker,
)

DATABASE = "chat"


class EmbeddedModel(Service):
    """`llama_cpp.server` with the embedded model, shared by every worker."""

    unprivileged = False
    start_within = 120.0

    def __init__(self, settings: Settings, folder: Path) -> None:
        super().__init__("model", folder)
        path, problem = model_path_problem(settings)
        if path is None:
            raise RuntimeError(problem)
        self.alias = path.stem
        self.settings = settings
        self.path = path

    def command(self) -> list[str]:
        return server_command(self.path, self.alias, self.port, self.settings)

    def environment(self) -> dict[str, str]:
        # The llama.cpp server reads plain names (PORT, MODEL...) as its own settings.
        return child_environment()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def worker_environment(settings: Settings, model: EmbeddedModel | None) -> dict[str, str]:
    """What the workers are told: the caller's own CHAT_*/OPENAI_* settings, and the model's."""
    env = {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIXES)}
    if model is not None:
        env["OPENAI_BASE_URL"] = model.url
        env["CHAT_MODEL"] = model.alias
        env.setdefault("CHAT_TEMPERATURE", str(LOCAL_TEMPERATURE))
        env.setdefault("CHAT_MAX_REPLY_TOKENS", str(DEFAULT_REPLY_TOKENS))
    return env


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the services were starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


STOPS = frozenset({signal.SIGINT, signal.SIGTERM})


class Signals:
    """SIGINT, SIGTERM and SIGCHLD as bytes on a socket, so that one wait watches for all of
    them and for a deadline, with no signal handler touching shared state."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        # A handler of Python's own is what makes the signal's number reach the socket.
        for signum in (*STOPS, signal.SIGCHLD):
            signal.signal(signum, lambda *_: None)

    def wait(self, within: float | None) -> set[int]:
        """The signals that arrive within `within` seconds (None: until one does)."""
        ready, _, _ = select.select([self.reader], [], [], within)
        return set(self.reader.recv(256)) if ready else set()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.reader.close()
        self.writer.close()


@dataclass
class Watched:
    """One worker as `keep_workers` sees it."""

    number: int
    worker: Worker
    started: float
    restarts: int = 0  # in a row
    due: float | None = None  # when to start it again, while it is down
    given_up: bool = False


def announce(number: int, worker: Worker) -> None:
    assert worker.process is not None
    print(f"worker {number}: pid {worker.process.pid}, {worker.http}", flush=True)


def keep_workers(
    deployment: Deployment, signals: Signals, policy: RestartPolicy | None = None
) -> int:
    """Start again any worker that exits, on its own port (nginx's list of workers stays),
    until SIGINT or SIGTERM; that signal's number.

    As with `python -m backend --workers N`, the delay doubles while a worker keeps dying, and
    one that dies again after `max_restarts` restarts in a row is left down.
    """
    policy = policy or RestartPolicy()
    now = time.monotonic()
    watched = [Watched(n, worker, now) for n, worker in enumerate(deployment.workers, 1)]
    while True:
        now = time.monotonic()
        for each in watched:
            process = each.worker.process
            if each.given_up or process is None:
                continue
            if each.due is not None:
                if now >= each.due:
                    each.worker.launch()
                    each.started, each.due = now, None
                    announce(each.number, each.worker)
                continue
            code = process.poll()
            if code is None:
                continue
            if now - each.started > policy.stable_after:
                each.restarts = 0
            each.restarts += 1
            said = f"worker {each.number} (pid {process.pid}) exited with code {code}"
            if each.restarts > policy.max_restarts:
                each.given_up = True
                log = f"; its log: {each.worker.log}" if each.worker.log else ""
                print(f"{said} after {policy.max_restarts} restarts: left down{log}", flush=True)
                continue
            delay = policy.delay(each.restarts)
            each.due = now + delay
            print(f"{said}; starting it again in {delay:.1f} s", flush=True)
        dues = [each.due for each in watched if each.due is not None]
        within = max(0.0, min(dues) - time.monotonic()) if dues else None
        stops = signals.wait(within) & STOPS
        if stops:
            return stops.pop()


def start_timeout(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2, help="chat workers (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    parser.add_argument("--data", default="data/deploy", help="where state is kept")
    parser.add_argument(
        "--start-timeout",
        type=start_timeout,
        default=START_WITHIN,
        metavar="SECONDS",
        help=f"how long each service may take to come up (default {START_WITHIN:g})",
    )
    args = parser.parse_args(argv)
    within: float = args.start_timeout
    settings = Settings()
    data = Path(args.data)
    services: list[Service | Deployment] = []
    # Until everything is up, a stop signal unwinds whatever is starting.
    for signum in STOPS:
        signal.signal(signum, interrupt)
    try:
        # Each is listed before it starts, so that one that fails to start is stopped too.
        postgres = Postgres(data / "postgres")
        postgres.start_within = within
        services.append(postgres)
        postgres.start()
        redis = Redis(data / "redis")
        redis.start_within = within
        services.append(redis)
        redis.start()
        model = None
        if settings.mode == "local":
            model = EmbeddedModel(settings, data / "model")
            model.start_within = max(within, EmbeddedModel.start_within)
            services.append(model)
            model.start()
        env = worker_environment(settings, model)
        env["CHAT_DATABASE_URL"] = postgres.database(DATABASE)
        env["CHAT_REDIS_URL"] = redis.url
        deployment = Deployment(
            args.workers, env, data / "nginx", args.port or free_port(), start_within=within
        )
        services.append(deployment)
        deployment.start()
        signals = Signals()
    except BaseException as exc:
        for signum in STOPS:
            signal.signal(signum, signal.SIG_IGN)
        for service in reversed(services):
            service.stop()
        if isinstance(exc, Interrupted):
            sys.exit(128 + exc.signum)
        if isinstance(exc, RuntimeError | OSError):
            sys.exit(f"python -m deploy.local: {exc}")
        raise
    try:
        print(f"Chat at http://127.0.0.1:{deployment.port}/ (Ctrl-C stops everything)")
        for number, worker in enumerate(deployment.workers, 1):
            announce(number, worker)
        print(f"PostgreSQL: {env['CHAT_DATABASE_URL']}")
        print(f"Redis: {redis.url}")
        if model is not None:
            print(f"model: {model.alias} at {model.url}")
        print(f"logs: {data.resolve()}/*/*.log", flush=True)
        keep_workers(deployment, signals)
    finally:
        # Further signals only wake `Signals`: a stop is not cut short half-way.
        for service in reversed(services):
            service.stop()
        signals.close()


if __name__ == "__main__":
    main()
