"""`python -m deploy.local [--workers N] [--port P] [--data DIR]`: a scaled-out chat server on
this machine, nginx in front of N workers (2 by default) on Redis and PostgreSQL.

Debian's `nginx`, `redis-server` and `postgresql` must be installed (`make test-deps` does it).
The model is the one the environment names (OPENAI_BASE_URL or OPENAI_API_KEY), or else the
embedded model, started once for all workers. Conversations are kept in DIR (default
data/deploy) across runs. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from backend.config import LOCAL_TEMPERATURE, Settings
from backend.local_model import (
    DEFAULT_REPLY_TOKENS,
    child_environment,
    model_path_problem,
    server_command,
)
from backend.server import free_port
from deploy.services import SETTINGS_PREFIXES, Deployment, Postgres, Redis, Service

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


def wait_for_a_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    parser.add_argument("--workers", type=int, default=2, help="chat workers (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    parser.add_argument("--data", default="data/deploy", help="where state is kept")
    args = parser.parse_args(argv)
    settings = Settings()
    data = Path(args.data)
    services: list[Service | Deployment] = []
    try:
        postgres = Postgres(data / "postgres")
        postgres.start()
        services.append(postgres)
        redis = Redis(data / "redis")
        redis.start()
        services.append(redis)
        model = None
        if settings.mode == "local":
            model = EmbeddedModel(settings, data / "model")
            model.start()
            services.append(model)
        env = worker_environment(settings, model)
        env["CHAT_DATABASE_URL"] = postgres.database(DATABASE)
        env["CHAT_REDIS_URL"] = redis.url
        deployment = Deployment(args.workers, env, data / "nginx", args.port or free_port())
        services.append(deployment)
        deployment.start()
    except (RuntimeError, OSError) as exc:
        for service in reversed(services):
            service.stop()
        sys.exit(f"python -m deploy.local: {exc}")
    print(f"Chat at http://127.0.0.1:{deployment.port}/ (Ctrl-C stops everything)")
    for number, worker in enumerate(deployment.workers, 1):
        assert worker.process is not None
        print(f"worker {number}: pid {worker.process.pid}, {worker.http}")
    print(f"PostgreSQL: {env['CHAT_DATABASE_URL']}")
    print(f"Redis: {redis.url}")
    if model is not None:
        print(f"model: {model.alias} at {model.url}")
    print(f"logs: {data.resolve()}/*/*.log", flush=True)
    try:
        wait_for_a_signal()
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    main()
