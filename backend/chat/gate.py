"""A lighter `asyncio.Event`, for what every open socket holds."""

from __future__ import annotations

import asyncio


class Gate:
    """An `asyncio.Event` (`set`, `clear`, `wait`, `is_set`; clear at first unless `open`)
    whose waiters' list exists only while someone waits: an Event's deque is 760 bytes, kept
    for every idle socket, for waits that happen only now and then."""

    __slots__ = ("open", "waiters")

    def __init__(self, open: bool = False) -> None:
        self.open = open
        self.waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self.open

    def set(self) -> None:
        self.open = True
        waiters, self.waiters = self.waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self.open = False

    async def wait(self) -> None:
        if self.open:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(waiter)
        try:
            await waiter
        finally:
            if self.waiters is not None and waiter in self.waiters:
                self.waiters.remove(waiter)
