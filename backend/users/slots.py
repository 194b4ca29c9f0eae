"""Counted slots: how many replies, or connections, each user has going at once.

A slot is taken when something starts and given back when it ends. In one process they are a
set per user. Across workers they are a Redis sorted set per user whose scores are expiry
times: each worker pushes back the expiry of the slots it holds every few seconds, so the slots
of a worker that died free themselves within `SLOT_TTL` instead of counting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any, Protocol, cast

from redis.asyncio.cluster import RedisCluster

from backend.config.redis_clients import SharedRedis, run_script
from backend.config.timings import SLOT_RENEW_EVERY, SLOT_TTL
from backend.protocol.errors import SHARED_STATE_ERRORS

log = logging.getLogger(__name__)

# Drop the expired slots, then take one if there is room (or it is already held).
ACQUIRE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', t)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], t + tonumber(ARGV[3]), ARGV[1])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])))
  return 1
end
return 0
"""
# Push back the expiry of slots still held (never bring back one that was dropped).
RENEW_SLOTS = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', t + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[1])))
end
"""


class Slots(Protocol):
    """Slots of one kind ("replies", "connections") per user."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, kind: str, who: str, holder: str, limit: int) -> bool:
        """Take a slot for `holder` if `who` holds fewer than `limit`; True if taken."""
        ...

    async def release(self, kind: str, who: str, holder: str) -> None:
        """Give `holder`'s slot back (nothing if it holds none)."""
        ...


class MemorySlots:
    """The slots of a single process."""

    def __init__(self) -> None:
        self._held: defaultdict[tuple[str, str], set[str]] = defaultdict(set)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acquire(self, kind: str, who: str, holder: str, limit: int) -> bool:
        held = self._held[kind, who]
        if holder in held or len(held) < limit:
            held.add(holder)
            return True
        if not held:
            del self._held[kind, who]
        return False

    async def release(self, kind: str, who: str, holder: str) -> None:
        held = self._held.get((kind, who))
        if held is None:
            return
        held.discard(holder)
        if not held:
            del self._held[kind, who]


class RedisSlots:
    """Slots every worker sees, in Redis."""

    def __init__(self, client: SharedRedis) -> None:
        self.redis = client
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW_SLOTS)
        # This worker's slots, renewed until released: (key, holder).
        self._mine: set[tuple[str, str]] = set()
        self._renewer: asyncio.Task[None] | None = None

    @staticmethod
    def key(kind: str, who: str) -> str:
        return f"chat:slots:{kind}:{who}"

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_all(), name="quota-slots")

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer

    async def acquire(self, kind: str, who: str, holder: str, limit: int) -> bool:
        key = self.key(kind, who)
        taken = await cast(Any, self._acquire(keys=[key], args=[holder, limit, SLOT_TTL]))
        if taken:
            self._mine.add((key, holder))
        return bool(taken)

    async def release(self, kind: str, who: str, holder: str) -> None:
        key = self.key(kind, who)
        # Forgotten first: a release cut short leaves a slot that expires, not one kept alive.
        self._mine.discard((key, holder))
        await cast(Any, self.redis.zrem(key, holder))

    async def _renew_all(self) -> None:
        while True:
            await asyncio.sleep(SLOT_RENEW_EVERY)
            mine = list(self._mine)
            if not mine:
                continue
            try:
                if isinstance(self.redis, RedisCluster):
                    # A script's keys must share a slot there: one call per slot held.
                    pipe = self.redis.pipeline(transaction=False)
                    for key, holder in mine:
                        await run_script(self._renew, [key], [SLOT_TTL, holder], pipe)
                    await pipe.execute()
                else:
                    await cast(
                        Any,
                        self._renew(
                            keys=[key for key, _ in mine],
                            args=[SLOT_TTL, *(holder for _, holder in mine)],
                        ),
                    )
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot renew quota slots: %s", exc)
