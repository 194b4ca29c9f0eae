"""Frames of the replies a worker runs, sent to their streams: one pipeline per round trip for
all of them.

Each reply queues its frames on a `Publisher` (tokens merge while they wait, as for a slow
client). One task per worker, the `Broadcaster`, takes whatever every publisher has queued and
sends it in a single pipeline, so under load one round trip to Redis carries the tokens of
many conversations. A conversation's frames are always sent in order; when Redis cannot be
reached they wait, and go once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time

from backend.cluster import STREAM_TTL_S, Cluster
from backend.errors import SHARED_STATE_ERRORS
from backend.outbox import Close, Outbox, Pending, TokenRun
from schemas import ChatResponse

log = logging.getLogger(__name__)

# The kind (field `k`) of a stream entry that is reply text.
TEXT = "text"
RETRY_AFTER = 0.2
# A stream's expiry is pushed back at most this often (and whenever a turn starts).
EXPIRE_EVERY = 60.0

StreamEntry = tuple[int, str, str]  # seq, frame JSON, kind


def stream_entry(item: Pending) -> StreamEntry | None:
    if isinstance(item, TokenRun):
        return item.seq or 0, item.to_json(), TEXT
    if isinstance(item, ChatResponse):
        return item.seq or 0, item.to_json(), item.type
    return None


class Publisher:
    """One reply's frames on their way to its conversation's stream."""

    def __init__(self, broadcaster: Broadcaster, conversation_id: str, position: int) -> None:
        self.broadcaster = broadcaster
        self.conversation_id = conversation_id
        self.position = position
        self.queue = Outbox(max_pending=1_000_000)
        self.fresh = True  # the first batch replaces the previous turn's stream
        self.expired_at = 0.0
        self.unsent: list[StreamEntry] = []
        self.retrying = False  # a send failed: some of `unsent` may be in the stream already
        self.closing = False
        self.done = asyncio.Event()

    def send(self, frame: ChatResponse) -> None:
        self.queue.send(frame)
        self.broadcaster.ready(self)

    def token(self, text: str, seq: int) -> None:
        self.queue.token(text, seq)
        self.broadcaster.ready(self)

    def take(self) -> list[StreamEntry]:
        """Everything queued since the last call, with what failed to go last time first."""
        for item in self.queue.take_now():
            entry = stream_entry(item)
            if entry is not None:
                self.unsent.append(entry)
            elif isinstance(item, Close):
                self.closing = True
        return self.unsent

    async def drain(self) -> None:
        """Send everything queued, then stop."""
        self.queue.close(0, "")
        self.broadcaster.ready(self)
        await self.done.wait()


class Broadcaster:
    """The worker's one sender of frames to Redis."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._ready: dict[Publisher, None] = {}  # in the order they became ready
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-broadcaster")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def publisher(self, conversation_id: str, position: int) -> Publisher:
        return Publisher(self, conversation_id, position)

    def ready(self, publisher: Publisher) -> None:
        self._ready[publisher] = None
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            ready, self._ready = list(self._ready), {}
            batches = [(publisher, publisher.take()) for publisher in ready]
            try:
                await self._send([(p, entries) for p, entries in batches if entries])
            except SHARED_STATE_ERRORS as exc:
                log.warning("could not publish frames (%s); retrying", exc)
                for publisher in ready:
                    publisher.retrying = True
                    self._ready.setdefault(publisher)
                await asyncio.sleep(RETRY_AFTER)
                self._wake.set()
                continue
            for publisher, entries in batches:
                entries.clear()
                if publisher.closing and publisher not in self._ready:
                    publisher.done.set()

    async def _send(self, batches: list[tuple[Publisher, list[StreamEntry]]]) -> None:
        if not batches:
            return
        await self._drop_sent([publisher for publisher, _ in batches if publisher.retrying])
        batches = [(publisher, entries) for publisher, entries in batches if entries]
        now = time.monotonic()
        # All or nothing, so a batch that failed can be sent again as it is.
        pipe = self.cluster.redis.pipeline(transaction=True)
        for publisher, entries in batches:
            key = Cluster.frames(publisher.conversation_id)
            if publisher.fresh:
                pipe.delete(key)
            position = str(publisher.position)
            for seq, frame, kind in entries:
                pipe.xadd(key, {"f": frame, "t": position, "k": kind}, id=f"{seq}-0")
            if publisher.fresh or now - publisher.expired_at > EXPIRE_EVERY:
                pipe.expire(key, STREAM_TTL_S)
                publisher.expired_at = now
        await pipe.execute()
        for publisher, _ in batches:
            publisher.fresh = False

    async def _drop_sent(self, publishers: list[Publisher]) -> None:
        """After a failure whose outcome is unknown, leave out what the streams already have."""
        if not publishers:
            return
        pipe = self.cluster.redis.pipeline(transaction=False)
        for publisher in publishers:
            pipe.xrevrange(Cluster.frames(publisher.conversation_id), count=1)
        lasts = await pipe.execute()
        for publisher, last in zip(publishers, lasts, strict=True):
            publisher.retrying = False
            if publisher.fresh or not last:
                continue
            sent = int(last[0][0].split("-", 1)[0])
            publisher.unsent[:] = [entry for entry in publisher.unsent if entry[0] > sent]
