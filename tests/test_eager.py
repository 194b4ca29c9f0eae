"""`start_eagerly`: a coroutine runs in the caller's step, and only what must wait goes on in a
task, in order, cancellable, with its errors where they belong."""

from __future__ import annotations

import asyncio

import pytest

from backend.speedups.eager import start_eagerly


async def test_a_coroutine_that_never_waits_is_done_on_return() -> None:
    done: list[str] = []

    async def send() -> None:
        done.append("sent")

    assert start_eagerly(send()) is None
    assert done == ["sent"]  # before the caller awaited anything


async def test_its_error_is_raised_to_the_caller() -> None:
    async def broken() -> None:
        raise OSError("socket closed")

    with pytest.raises(OSError, match="socket closed"):
        start_eagerly(broken())


async def test_one_that_waits_goes_on_in_a_task_from_where_it_stopped() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def send() -> None:
        steps.append("started")
        await gate.wait()
        steps.append("resumed")
        await asyncio.sleep(0)
        steps.append("finished")

    task = start_eagerly(send())
    assert task is not None
    assert steps == ["started"]
    gate.set()
    await task
    assert steps == ["started", "resumed", "finished"]


async def test_the_task_can_be_cancelled_and_the_coroutine_sees_it() -> None:
    seen: list[str] = []

    async def send() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = start_eagerly(send())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_an_error_after_waiting_is_the_task_s() -> None:
    gate = asyncio.Event()

    async def send() -> None:
        await gate.wait()
        raise ConnectionResetError("peer went away")

    task = start_eagerly(send())
    assert task is not None
    gate.set()
    with pytest.raises(ConnectionResetError):
        await task
