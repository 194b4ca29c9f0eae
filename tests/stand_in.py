"""A tiny stand-in for a supervised server, and a parent that supervises it.

`python -m tests.stand_in serve|stubborn|crash FOLDER` is the child: it notes each start in
FOLDER/starts, then serves forever (with a grandchild in its process group), serves while
ignoring SIGTERM, or exits with code 3 at once. `python -m tests.stand_in parent FOLDER`
supervises a `serve` child, prints its pid once it is ready, and stops it on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backend.process.supervisor import RestartPolicy, Supervisor

CRASH_CODE = 3


def child_command(mode: str, folder: Path) -> list[str]:
    """How a stand-in child is started."""
    return [sys.executable, "-m", "tests.stand_in", mode, str(folder)]


def stand_in_supervisor(mode: str, folder: Path, policy: RestartPolicy) -> Supervisor:
    """A supervisor of a stand-in child, ready when the running child says it is."""

    async def answers() -> bool:
        return (folder / f"ready-{supervisor.pid}").exists()

    supervisor = Supervisor("stand-in", child_command(mode, folder), answers, policy=policy)
    return supervisor


def run_child(mode: str, folder: Path) -> None:
    """Be the supervised child."""
    with (folder / "starts").open("a") as starts:
        starts.write(f"{os.getpid()} {time.monotonic()}\n")
    if mode == "crash":
        print("Error: the stand-in crashed on purpose", flush=True)
        sys.exit(CRASH_CODE)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen(["sleep", "60"])
    (folder / f"grandchild-{os.getpid()}").write_text(str(grandchild.pid))
    (folder / f"ready-{os.getpid()}").write_text("")
    print("serving", flush=True)
    while True:
        time.sleep(60)


async def run_parent(folder: Path) -> None:
    """Supervise a `serve` child until SIGTERM or SIGINT; print its pid once it is ready."""
    supervisor = stand_in_supervisor("serve", folder, RestartPolicy(first_delay=0.05))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    supervisor.start()
    await supervisor.wait_ready()
    print(supervisor.pid, flush=True)
    await stopping.wait()
    await supervisor.stop()


if __name__ == "__main__":
    role, where = sys.argv[1], Path(sys.argv[2])
    if role == "parent":
        asyncio.run(run_parent(where))
    else:
        run_child(role, where)
