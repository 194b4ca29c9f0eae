"""`python -m backend --workers N`: N server processes sharing one listening socket.

The parent binds the port once and runs each worker as a supervised child (`--fd`), restarted
if it dies. The kernel spreads new connections over the workers, and since any worker serves
any conversation (through Redis and the shared database) none of them needs to be sticky.
SIGTERM or Ctrl-C to the parent drains every worker as one would drain alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from backend.config.settings import Settings
from backend.observe.metrics import MULTIPROCESS_DIR
from backend.process.server import bind
from backend.process.supervisor import RestartPolicy, Supervisor

log = logging.getLogger(__name__)

# Seconds a worker gets beyond its own shutdown grace before it is killed.
STOP_MARGIN = 10.0


def scale_out_problem(settings: Settings) -> str | None:
    """Why several workers cannot share these settings' conversations, if they cannot."""
    if not settings.chat_redis_url:
        return "several workers share live replies through Redis: set CHAT_REDIS_URL."
    if settings.chat_database_url.startswith("sqlite"):
        return (
            "several workers share one database, which SQLite cannot serve well: set "
            "CHAT_DATABASE_URL to a PostgreSQL database (postgresql+asyncpg://...)."
        )
    if settings.mode == "local":
        return (
            "the embedded model serves a single process: run a model server once and point "
            "the workers at it with OPENAI_BASE_URL (or OPENAI_API_KEY for OpenAI)."
        )
    return None


def shared_metrics_dir() -> str | None:
    """Where the workers write their metrics for each other (see backend/observe/metrics.py): the
    folder `PROMETHEUS_MULTIPROC_DIR` names, emptied, or a new one; the new one is returned,
    for removal when the workers stop."""
    given = os.environ.get(MULTIPROCESS_DIR)
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        return None
    made = tempfile.mkdtemp(prefix="chat-metrics-")
    os.environ[MULTIPROCESS_DIR] = made  # inherited by every worker
    return made


async def serve_workers(count: int, host: str, port: int, settings: Settings) -> None:
    """Run `count` workers on `host`:`port` until SIGTERM or SIGINT, then drain them all."""
    listener = bind(host, port)
    listener.set_inheritable(True)
    metrics_dir = shared_metrics_dir()
    policy = RestartPolicy(stop_grace=settings.chat_shutdown_grace + STOP_MARGIN)
    command = [sys.executable, "-m", "backend", "--fd", str(listener.fileno())]
    workers = [
        Supervisor(
            f"worker {number}",
            command,
            None,  # the workers share one socket: a request cannot ask one of them
            policy=policy,
            share_output=True,
            pass_fds=[listener.fileno()],
            on_exit=mark_process_dead,
        )
        for number in range(1, count + 1)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving on http://%s:%d with %d workers", host, port, count)
    for worker in workers:
        worker.start()
    await stop.wait()
    log.info("stopping %d workers", count)
    await asyncio.gather(*(worker.stop() for worker in workers))
    listener.close()
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
