"""One reader per worker for the frames of every conversation its clients follow.

A blocking `XREAD` over all those streams at once, on a connection of its own, so a worker
with ten thousand sockets holds one Redis connection for them, not ten thousand, and one
round trip carries the new frames of many conversations when many are streaming. A
conversation that starts being followed wakes the read in flight (an entry on the worker's own
wake stream), so it is read from the next round trip on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as redis

from backend.cluster.shared import Cluster, Entry
from backend.config.redis_clients import redis_options
from backend.config.timings import STREAM_TTL_S
from backend.protocol.errors import SHARED_STATE_ERRORS

log = logging.getLogger(__name__)

# Longest a read blocks (then it is issued again).
BLOCK_MS = 1000
# How long a conversation newly followed waits to be read before the read in flight is woken
# for it: long enough that a read issued meanwhile (one that returned), or the conversation
# no longer being followed (its reply begun here), saves the wake; short against a reply.
WAKE_AFTER = 0.01
RETRY_AFTER = 0.5

Handler = Callable[[list[Entry]], None]


class Tail:
    """Follows conversations' streams from a `seq` on, calling a handler with new entries."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # A connection of its own: a blocking read holds it.
        self.redis = redis.Redis.from_url(cluster.url, decode_responses=True, **redis_options())
        self.wake_key = f"chat:wake:{cluster.worker}"
        self._positions: dict[str, int] = {}
        self._handlers: dict[str, Handler] = {}
        self._task: asyncio.Task[None] | None = None
        self._waking: set[asyncio.Task[None]] = set()
        # Conversations followed since the read in flight was issued; a wake is due for them.
        self._unread: set[str] = set()
        self._wake_due: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-tail")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        await self.redis.aclose()

    def follow(self, conversation_id: str, after: int, handler: Handler) -> None:
        """Call `handler` with the conversation's entries after `after`, as they come."""
        self._positions[conversation_id] = after
        self._handlers[conversation_id] = handler
        self._unread.add(conversation_id)
        if self._wake_due is None:
            self._wake_due = asyncio.get_running_loop().call_later(WAKE_AFTER, self._wake)

    def unfollow(self, conversation_id: str) -> None:
        self._positions.pop(conversation_id, None)
        self._handlers.pop(conversation_id, None)

    def advance(self, conversation_id: str, seq: int) -> None:
        """Entries up to `seq` are known already: read from there on."""
        if self._positions.get(conversation_id, seq) < seq:
            self._positions[conversation_id] = seq

    def _wake(self) -> None:
        self._wake_due = None
        if not any(conversation_id in self._handlers for conversation_id in self._unread):
            return
        task = asyncio.create_task(self._add_wake())
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _add_wake(self) -> None:
        pipe = self.cluster.redis.pipeline(transaction=False)
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=1, approximate=False)
        pipe.expire(self.wake_key, STREAM_TTL_S)
        try:
            await pipe.execute()
        except SHARED_STATE_ERRORS as exc:
            # The conversation is read from the next round trip on, within `BLOCK_MS`.
            log.warning("cannot wake the conversations' reader (%s)", exc)

    async def _run(self) -> None:
        woken = "0-0"
        while True:
            streams: dict[Any, Any] = {self.wake_key: woken}
            self._unread.clear()
            for conversation_id, seq in self._positions.items():
                streams[Cluster.frames(conversation_id)] = f"{seq}-0"
            try:
                response = await cast(Any, self.redis.xread(streams, block=BLOCK_MS))
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot read the conversations' streams (%s); retrying", exc)
                await asyncio.sleep(RETRY_AFTER)
                continue
            for key, raws in response or []:
                if key == self.wake_key:
                    woken = raws[-1][0]
                    continue
                conversation_id = Cluster.conversation_of(key)
                handler = self._handlers.get(conversation_id)
                if handler is None or not raws:
                    continue
                entries = [Entry.decode(raw) for raw in raws]
                self.advance(conversation_id, entries[-1].seq)
                try:
                    handler(entries)
                except Exception:
                    log.exception("delivering a conversation's frames failed")
