"""One supervised child: started, probed until ready, restarted with backoff, never orphaned.

The child gets its own process group and, on Linux, dies with its parent (`PR_SET_PDEATHSIG`),
so it never outlives us, whether we stop cleanly, are interrupted, or are killed. `stop()`
ends the whole group, so whatever the child started goes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# Words that make a line of the child's output a warning in our log.
LOUD_WORDS = ("Error", "ERROR", "Traceback", "error:")
# Output without a line break is logged in pieces of at most this many bytes.
MAX_LINE = 64 * 1024

State = Literal["stopped", "starting", "ready", "restarting", "failed"]
# Whether the child answers yet; called repeatedly while it starts.
Probe = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class RestartPolicy:
    """How often, and how soon, a child that died is started again."""

    max_restarts: int = 5  # in a row; then supervision gives up
    first_delay: float = 0.5  # seconds before the first restart; doubles each time
    max_delay: float = 10.0
    stable_after: float = 60.0  # a child that stayed up this long has its count forgiven
    probe_every: float = 0.2  # seconds between readiness probes while the child starts
    stop_grace: float = 5.0  # seconds from SIGTERM to SIGKILL when stopping

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart number `restart` (1, 2, ...)."""
        return float(min(self.first_delay * 2 ** (restart - 1), self.max_delay))


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `pid`, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Supervisor:
    """Runs `command` as a child, waits until `probe` says it answers (with no probe, until it
    has started), restarts it when it dies.

    `ready` is set while the child answers; `failed` once it died more than the policy allows
    and supervision gave up. Its output goes line by line to `output`: problems as warnings,
    the rest at DEBUG; or, with `share_output`, straight to our own stdout and stderr.
    `pass_fds` are file descriptors the child inherits (a listening socket, say).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        probe: Probe | None,
        *,
        env: Callable[[], Mapping[str, str]] | None = None,
        policy: RestartPolicy | None = None,
        output: logging.Logger | None = None,
        share_output: bool = False,
        pass_fds: Sequence[int] = (),
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.probe = probe
        # Read at every start, so each child sees the environment as it is then.
        self.env = env
        self.policy = policy or RestartPolicy()
        self.output = output or log
        self.share_output = share_output
        self.pass_fds = tuple(pass_fds)
        self.on_exit = on_exit  # called with the process id of each child that exited
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        self.label = f"[{self.output.name.rsplit('.', 1)[-1]}]"
        self._child: _Child | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> State:
        """Where the child is in its life, derived from the events and the supervising task."""
        if self.failed.is_set():
            return "failed"
        if self.ready.is_set():
            return "ready"
        if self._task is None or self._task.done():
            return "stopped"
        return "starting" if self.restarts == 0 else "restarting"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        child = self._child
        return child.pid if child is not None and child.returncode is None else None

    def start(self) -> None:
        """Begin supervising; returns at once, `ready` tells when the child answers."""
        self.failed.clear()
        self.restarts = 0
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def wait_ready(self) -> bool:
        """Wait until the child answers (True) or supervision gives up (False)."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self.ready, self.failed)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self.ready.is_set()

    async def wait_exit(self, within: float) -> None:
        """Give a child that may be dying up to `within` seconds to be seen exiting."""
        if self._child is not None:
            await asyncio.wait([self._child.exited], timeout=within)

    async def stop(self) -> None:
        """Stop supervising, then end the child's whole process group."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        child, self._child = self._child, None
        if child is not None:
            if child.returncode is None:
                signal_group(child.pid, signal.SIGTERM)
                _, running = await asyncio.wait([child.exited], timeout=self.policy.stop_grace)
                if running:
                    signal_group(child.pid, signal.SIGKILL)
                    await child.exited
            child.transport.close()
        self.ready.clear()
        self.failed.clear()

    async def _supervise(self) -> None:
        """Start the child and restart it whenever it dies, until told to stop or giving up."""
        policy = self.policy
        while True:
            started = time.monotonic()
            try:
                exit_code = await self._run_once()
            except OSError as exc:
                log.error("cannot start the %s: %s", self.name, exc)
                exit_code = -1
            self.ready.clear()
            self.last_exit = exit_code
            if time.monotonic() - started > policy.stable_after:
                self.restarts = 0
            self.restarts += 1
            if self.restarts > policy.max_restarts:
                log.error(
                    "the %s exited %d times in a row; giving up", self.name, policy.max_restarts
                )
                self.failed.set()
                return
            delay = policy.delay(self.restarts)
            log.warning(
                "the %s exited with code %s; restarting in %.1f s (attempt %d of %d)",
                self.name,
                exit_code,
                delay,
                self.restarts,
                policy.max_restarts,
            )
            await asyncio.sleep(delay)

    async def _run_once(self) -> int:
        """Run the child until it exits; its exit code."""
        started = time.monotonic()
        log.info("starting the %s", self.name)
        _, child = await asyncio.get_running_loop().subprocess_exec(
            lambda: _Child(self._log_line),
            *self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=None if self.share_output else asyncio.subprocess.PIPE,
            stderr=None if self.share_output else asyncio.subprocess.STDOUT,
            pass_fds=self.pass_fds,
            env=dict(self.env()) if self.env is not None else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._child = child
        probing = asyncio.create_task(self._probe_until_ready(child, started))
        try:
            await asyncio.shield(child.exited)  # a stop cancels us, not the child's exit
        finally:
            probing.cancel()
        # Whatever the child left running in its group goes with it.
        signal_group(child.pid, signal.SIGKILL)
        child.transport.close()
        if self.on_exit is not None:
            self.on_exit(child.pid)
        return child.returncode if child.returncode is not None else -1

    async def _probe_until_ready(self, child: _Child, started: float) -> None:
        if self.probe is None:  # it cannot be asked apart from its siblings: started is all
            self.ready.set()
            log.info("the %s started (pid %d)", self.name, child.pid)
            return
        while child.returncode is None:
            with contextlib.suppress(Exception):
                if await self.probe():
                    self.ready.set()
                    log.info("the %s is ready after %.1f s", self.name, time.monotonic() - started)
                    return
            await asyncio.sleep(self.policy.probe_every)

    def _log_line(self, line: str) -> None:
        """One line of the child's output into our log: problems loud, the rest at DEBUG."""
        if line:
            loud = any(word in line for word in LOUD_WORDS)
            self.output.log(logging.WARNING if loud else logging.DEBUG, "%s %s", self.label, line)


class _Child(asyncio.SubprocessProtocol):
    """One run of the child: its output, split into lines, and its exit."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.SubprocessTransport
        self._emit = emit
        self._partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A subprocess transport, though not always a subclass of asyncio's (uvloop's is not).
        self.transport = cast(asyncio.SubprocessTransport, transport)

    @property
    def pid(self) -> int:
        pid: int = self.transport.get_pid()
        return pid

    @property
    def returncode(self) -> int | None:
        code: int | None = self.transport.get_returncode()
        return code

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._emit(line.decode(errors="replace").rstrip())

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if self._partial:
            self._emit(self._partial.decode(errors="replace").rstrip())
            self._partial = b""

    def process_exited(self) -> None:
        # Called on exit, even while something the child started still holds its pipes.
        if not self.exited.done():
            self.exited.set_result(None)
