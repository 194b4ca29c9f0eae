"""Frames of the replies a worker runs, sent to their streams: one pipeline per round trip for
all of them.

Each reply queues its frames on a `Publisher` (tokens merge while they wait, as for a slow
client). One task per worker, the `Broadcaster`, takes whatever every publisher has queued and
sends it in a single pipeline, so under load one round trip to Redis carries the tokens of
many conversations. A conversation's frames are always sent in order; when Redis cannot be
reached they wait, and go once it is back. A stream that Redis lost meanwhile (it restarted)
is written anew, from the turn's first frame, before anything more is added to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from backend.chat.outbox import TokenRun
from backend.cluster.shared import TEXT, Cluster, Entry
from backend.config.timings import STREAM_TTL_S
from backend.protocol.errors import SHARED_STATE_ERRORS
from schemas import ChatResponse

log = logging.getLogger(__name__)

RETRY_AFTER = 0.2
# Rounds that carry only reply text go at most this often, so that under load each carries
# more of it: a round costs the worker far more CPU than the tokens in it. Any other frame
# (a question said back, a reply's start or end, an error), a reply's first token and a
# drain go at once.
ROUND_EVERY = 0.005
# A stream's expiry is pushed back at most this often (and whenever a turn starts).
EXPIRE_EVERY = 60.0


class Publisher:
    """One reply's frames on their way to its conversation's stream.

    `so_far()` gives the turn's frames up to now, should its stream have to be written anew
    (None: not to be written any more, the conversation being deleted); `taken()` is called
    if another worker holds the conversation by then.
    """

    def __init__(
        self,
        broadcaster: Broadcaster,
        conversation_id: str,
        position: int,
        first: int,
        so_far: Callable[[], list[Entry] | None],
        taken: Callable[[], None],
    ) -> None:
        self.broadcaster = broadcaster
        self.conversation_id = conversation_id
        self.position = position
        self.first = first  # the `seq` of the turn's first frame
        self.so_far = so_far
        self.taken = taken
        # Frames not taken by the broadcaster yet; consecutive tokens merge into one run.
        self.queued: list[ChatResponse | TokenRun] = []
        self.fresh = True  # the first batch replaces the previous turn's stream
        self.expired_at = 0.0
        self.unsent: list[Entry] = []
        # The `seq` of the stream's last entry before `unsent`; -1: not known (followers on a
        # cluster then read the stream rather than trust the batch to follow on).
        self.published = first - 1
        self.retrying = False  # a send failed: some of `unsent` may be in the stream already
        self.restoring = False  # the stream was lost: `unsent` is the whole turn, to write anew
        # Another worker may run the conversation now: the rest goes to the stream only while
        # that still holds this turn.
        self.guarded = False
        self.closing = False  # nothing more comes: done once the queue is sent
        self.first_token = True
        self.done = asyncio.Event()
        # Given the entries once the stream has them, if set.
        self.delivered: Callable[[list[Entry]], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Publisher {self.conversation_id} turn {self.position}: {len(self.queued)} queued,"
            f" {len(self.unsent)} unsent{', closing' if self.closing else ''}>"
        )

    def send(self, frame: ChatResponse) -> None:
        self.queued.append(frame)
        self.broadcaster.ready(self, urgent=True)

    def token(self, text: str, seq: int) -> None:
        queued = self.queued
        if queued and isinstance(queued[-1], TokenRun):
            run = queued[-1]
            run.parts.append(text)
            run.seq = seq
        else:
            queued.append(TokenRun([text], seq))
        self.broadcaster.ready(self, urgent=self.first_token)
        self.first_token = False

    def take(self) -> list[Entry]:
        """Everything queued since the last call, with what failed to go last time first."""
        queued, self.queued = self.queued, []
        position = self.position
        for item in queued:
            if isinstance(item, TokenRun):
                self.unsent.append(Entry(item.seq or 0, item.to_json(), TEXT, position))
            else:
                self.unsent.append(Entry(item.seq or 0, item.to_json(), item.type, position))
        return self.unsent

    def lost(self) -> None:
        """The stream is gone (Redis lost it): the turn so far is to be written anew, whole."""
        self.published = -1
        self.take()  # all of it is in the turn already
        entries = self.so_far()
        self.unsent = [] if entries is None else entries
        self.restoring = entries is not None
        self.retrying = False

    def restored(self, written: bool) -> None:
        """The stream was written anew (`written`), or another worker holds the conversation."""
        self.unsent = []
        self.restoring = False
        self.fresh = False
        self.expired_at = time.monotonic()
        if not written:
            self.guard()
            self.taken()

    def guard(self) -> None:
        """Another worker may run the conversation now: what is left of this reply goes to the
        stream only while it still holds this turn (the store keeps the reply either way)."""
        self.guarded = True
        self.restoring = False

    def deliver(self, entries: list[Entry]) -> None:
        """Entries the stream has now, to whoever takes them here."""
        if self.delivered is not None and entries:
            try:
                self.delivered(entries)
            except Exception:
                log.exception("delivering a reply's frames failed")

    async def drain(self) -> None:
        """Send everything queued, then stop."""
        self.closing = True
        self.broadcaster.ready(self, urgent=True)
        await self.done.wait()


class Broadcaster:
    """The worker's one sender of frames to Redis."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._ready: dict[Publisher, None] = {}  # in the order they became ready
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # something is ready that goes at once
        self._began = 0.0  # when the last round began (`loop.time()`)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-broadcaster")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def publisher(
        self,
        conversation_id: str,
        position: int,
        first: int,
        so_far: Callable[[], list[Entry] | None],
        taken: Callable[[], None],
    ) -> Publisher:
        return Publisher(self, conversation_id, position, first, so_far, taken)

    def ready(self, publisher: Publisher, urgent: bool = False) -> None:
        self._ready[publisher] = None
        self._wake.set()
        if urgent:
            self._urgent.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            pause = self._began + ROUND_EVERY - loop.time()
            if pause > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._urgent.wait()
            self._began = loop.time()
            self._wake.clear()
            self._urgent.clear()
            ready, self._ready = list(self._ready), {}
            for publisher in ready:
                publisher.take()
            try:
                await self._restore([p for p in ready if p.restoring])
                await self._append([p for p in ready if p.guarded and p.unsent])
                await self._send([p for p in ready if p.unsent and not (p.restoring or p.guarded)])
            except SHARED_STATE_ERRORS as exc:
                log.warning("could not publish frames (%s); retrying", exc)
                for publisher in ready:
                    publisher.retrying = not (publisher.restoring or publisher.guarded)
                    self._ready.setdefault(publisher)
                await asyncio.sleep(RETRY_AFTER)
                self._wake.set()
                continue
            for publisher in ready:
                if publisher.restoring:  # found lost: written anew next round
                    self.ready(publisher, urgent=True)
                elif publisher.closing and publisher not in self._ready:
                    publisher.done.set()

    async def _restore(self, publishers: list[Publisher]) -> None:
        """Write lost streams anew, each with its turn so far (rare: one round trip each)."""
        for publisher in publishers:
            written = await self.cluster.restore(
                publisher.conversation_id, publisher.position, publisher.unsent
            )
            if written:
                log.warning("a reply's stream that Redis had lost was written anew")
                publisher.deliver(publisher.unsent)
            else:
                log.warning("another worker took a conversation whose stream Redis had lost")
            publisher.restored(written)

    async def _append(self, publishers: list[Publisher]) -> None:
        """The rest of replies that may have been taken over: only into their own turn."""
        for publisher in publishers:
            await self.cluster.append_to_turn(
                publisher.conversation_id, publisher.position, publisher.first, publisher.unsent
            )
            publisher.unsent.clear()

    async def _send(self, publishers: list[Publisher]) -> None:
        if not publishers:
            return
        await self._drop_sent([publisher for publisher in publishers if publisher.retrying])
        publishers = [publisher for publisher in publishers if publisher.unsent]
        now = time.monotonic()
        # Not a transaction (which costs the worker a reply to parse for every command, and
        # on a cluster could span one slot only): a batch that failed is sent again less what
        # its streams got (`_drop_sent`).
        pipe = self.cluster.redis.pipeline(transaction=False)
        firsts = []  # where each publisher's first entry is among the answers
        for publisher in publishers:
            key = Cluster.frames(publisher.conversation_id)
            if publisher.fresh:
                pipe.delete(key)
                self.cluster.turn_begun(pipe, publisher.conversation_id)
            firsts.append(len(pipe))
            # Only into a stream that exists, once begun: one Redis lost is not begun again
            # from the middle of its turn.
            keep = not publisher.fresh
            for entry in publisher.unsent:
                pipe.xadd(key, entry.fields(), id=entry.id, nomkstream=keep)  # type: ignore[arg-type]
            if publisher.fresh or now - publisher.expired_at > EXPIRE_EVERY:
                pipe.expire(key, STREAM_TTL_S)
                publisher.expired_at = now
            self.cluster.tell_followers(
                pipe, publisher.conversation_id, publisher.unsent, publisher.published
            )
        answers = await pipe.execute()
        for publisher, first in zip(publishers, firsts, strict=True):
            if answers[first] is None:
                publisher.lost()
                continue
            publisher.fresh = False
            publisher.published = publisher.unsent[-1].seq
            publisher.deliver(publisher.unsent)
            publisher.unsent.clear()

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
            publisher.published = -1
            if publisher.fresh or not last:
                continue
            sent = Entry.decode(last[0]).seq
            # What the stream has already goes to the clients here now, the rest once sent.
            publisher.deliver([entry for entry in publisher.unsent if entry.seq <= sent])
            publisher.unsent[:] = [entry for entry in publisher.unsent if entry.seq > sent]
