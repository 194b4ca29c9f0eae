"""Start a coroutine at once, in the caller's step, as Python 3.12's eager tasks do.

Sending a token from the task that received it, instead of waking a writer task, saves the
writer's turn at the back of the event loop's queue: under load, behind every other stream's
work of that loop iteration. A send to a socket that can take it never suspends, so it simply
completes here; one that must wait (a slow client) goes on in a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` until it first waits: None if it finished (its exception, if it raised,
    is raised here), else the task that runs the rest of it."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return asyncio.ensure_future(_Rest(coro, waiting))


class _Rest:
    """The rest of a started coroutine, as an awaitable a task can drive: it waits on what
    the coroutine was waiting on, then resumes it, until it returns."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                yield waiting  # an asyncio future, exactly as the coroutine yielded it
            except BaseException as exc:  # cancelled while waiting: the coroutine decides
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                return
