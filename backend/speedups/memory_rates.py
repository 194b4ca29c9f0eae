"""`limits`' memory storage, sweeping out expired entries at most once a second.

Its own sweep runs after every hit and hops to a worker thread each time, which a busy server
pays for in latency. Entries are compared with the clock when they are read, so the sweep only
frees memory: less often is as correct.

It overrides a name-mangled private method, `MemoryStorage._MemoryStorage__schedule_expiry`
(`usable("memory_rates")` checks it is still there).
"""

from __future__ import annotations

import time

from limits.aio.storage import MemoryStorage

from backend.config.timings import RATES_SWEEP_EVERY


class MemoryRates(MemoryStorage):
    """`limits`' memory storage, sweeping out expired entries every `RATES_SWEEP_EVERY` s."""

    def __init__(self) -> None:
        super().__init__()
        self._swept = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now - self._swept >= RATES_SWEEP_EVERY:
            self._swept = now
            await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]
