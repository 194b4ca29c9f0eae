"""The child-process supervisor, against a tiny stand-in child: restart, backoff, no orphans."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend.process.supervisor import RestartPolicy, Supervisor
from tests.harness import UNIT, alive, python_process, signal_leaves_no_orphan, wait_gone
from tests.stand_in import CRASH_CODE, stand_in_supervisor

FAST = RestartPolicy(first_delay=0.05, probe_every=0.02, stop_grace=0.3)


def starts(folder: Path) -> list[tuple[int, float]]:
    """Each start of a stand-in child: its pid and when it began."""
    lines = (folder / "starts").read_text().split()
    return [(int(pid), float(at)) for pid, at in zip(lines[::2], lines[1::2], strict=True)]


def grandchild_of(folder: Path, pid: int) -> int:
    return int((folder / f"grandchild-{pid}").read_text())


async def ready_pid(supervisor: Supervisor, not_pid: int | None = None) -> int:
    """The pid of the child once it is ready (a new one, if `not_pid`)."""
    async with asyncio.timeout(UNIT * 2):
        while not supervisor.ready.is_set() or supervisor.pid in (None, not_pid):
            await supervisor.wait_ready()
            await asyncio.sleep(0.01)
    pid = supervisor.pid
    assert pid is not None
    return pid


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[Supervisor]:
    supervisor = stand_in_supervisor("serve", tmp_path, FAST)
    supervisor.start()
    yield supervisor
    await supervisor.stop()


async def test_child_becomes_ready(serving: Supervisor, tmp_path: Path) -> None:
    initial = serving.state
    assert initial == "starting"
    pid = await ready_pid(serving)
    assert serving.state == "ready"
    assert alive(pid)
    assert starts(tmp_path)[0][0] == pid


async def test_killed_child_is_restarted(serving: Supervisor, tmp_path: Path) -> None:
    first = await ready_pid(serving)
    os.kill(first, signal.SIGKILL)
    second = await ready_pid(serving, not_pid=first)
    assert serving.restarts == 1
    assert serving.last_exit == -signal.SIGKILL
    assert [pid for pid, _ in starts(tmp_path)] == [first, second]
    assert serving.state == "ready"


async def test_crashing_child_backs_off_then_gives_up(tmp_path: Path) -> None:
    policy = RestartPolicy(max_restarts=3, first_delay=0.05, probe_every=0.02)
    supervisor = stand_in_supervisor("crash", tmp_path, policy)
    supervisor.start()
    async with asyncio.timeout(UNIT * 3):
        assert await supervisor.wait_ready() is False
    assert supervisor.failed.is_set()
    given_up = supervisor.state
    assert given_up == "failed"
    assert supervisor.last_exit == CRASH_CODE
    times = [at for _, at in starts(tmp_path)]
    assert len(times) == 1 + policy.max_restarts
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for restart, gap in enumerate(gaps, start=1):
        assert gap >= policy.delay(restart), gaps  # 0.05, 0.1, 0.2: doubling
    await supervisor.stop()
    assert supervisor.state == "stopped"


async def test_a_child_that_stayed_up_has_its_restarts_forgiven(tmp_path: Path) -> None:
    policy = RestartPolicy(max_restarts=1, first_delay=0.05, probe_every=0.02, stable_after=0.2)
    supervisor = stand_in_supervisor("serve", tmp_path, policy)
    supervisor.start()
    try:
        pid = await ready_pid(supervisor)
        for _ in range(3):
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            pid = await ready_pid(supervisor, not_pid=pid)
            assert supervisor.restarts == 1
        assert not supervisor.failed.is_set()
    finally:
        await supervisor.stop()


async def test_stop_ends_the_whole_process_group(serving: Supervisor, tmp_path: Path) -> None:
    pid = await ready_pid(serving)
    grandchild = grandchild_of(tmp_path, pid)
    assert alive(grandchild)
    await serving.stop()
    assert serving.state == "stopped"
    assert not alive(pid)
    await wait_gone(grandchild)
    assert len(starts(tmp_path)) == 1  # stopping is not a death to restart from


async def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    supervisor = stand_in_supervisor("stubborn", tmp_path, FAST)
    supervisor.start()
    pid = await ready_pid(supervisor)
    async with asyncio.timeout(FAST.stop_grace + UNIT):
        await supervisor.stop()
    assert not alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
async def test_no_orphan_when_the_parent_dies(tmp_path: Path, sig: signal.Signals) -> None:
    async with python_process(
        "-m", "tests.stand_in", "parent", str(tmp_path), stdout=asyncio.subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        async with asyncio.timeout(UNIT * 2):
            child = int(await parent.stdout.readline())
        await signal_leaves_no_orphan(parent, sig, child)
