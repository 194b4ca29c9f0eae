"""A conversation shared by several workers through Redis (see `backend/cluster.py`).

The worker that receives a question takes the conversation's lease (stopping the reply that
runs elsewhere first, if any), answers it, and publishes every frame to the conversation's
stream (through the worker's one sender, `backend/publishing.py`). Every client, on whichever
worker, is first caught up (stored turns, then the stream's turn after its `after`) and then
fed from the stream by its worker's one reader (`backend/tail.py`), each `seq` once, so a client
that joins or rejoins on any worker gets exactly what it missed. Before a worker lets go of the
lease it stores the turn, so the database holds every turn but the latest and the stream holds
the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass

from backend.cluster import RENEW_EVERY, Cluster, Entry, StreamEntry
from backend.conversation import Conversation, Services
from backend.errors import SHARED_STATE_ERRORS, UNREACHABLE, ChatError, ClientGone
from backend.history import History
from backend.outbox import Outbox, Raw
from backend.publishing import TEXT, TEXT_SO_FAR, Broadcaster, Publisher
from backend.quotas import Held
from backend.records import ConversationRecord, TurnRecord, now, title_for
from backend.tail import Tail
from schemas import ChatResponse

log = logging.getLogger(__name__)

# Seconds between checks, while a turn is open, that a worker still runs it.
CHECK_RUNNER_EVERY = 1.0
# How long a worker waits for another to give up a conversation it was asked to stop.
TAKE_OVER_WITHIN = 10.0
ASK_AGAIN_AFTER = 0.05
DROPPED = "The worker writing this reply stopped; the text so far is kept. Ask again to go on."
TAKEN = (
    "This reply was stopped: while the server could not reach Redis, another worker took the "
    "conversation over. The text so far is kept; ask again to go on."
)


def replayed(entries: list[Entry], after: int = 0) -> Iterator[Raw | ChatResponse]:
    """Stream entries after `seq` `after` as frames for a client catching up: runs of reply
    text as one frame."""
    run: list[Entry] = []
    for entry in entries:
        kind = entry[2].get("k")
        if kind == TEXT:
            run.append(entry)
            continue
        yield from _merged(run)
        run = []
        if kind == TEXT_SO_FAR:
            yield _text_after(entry, after)
        else:
            yield Raw(entry[0], entry[1])
    yield from _merged(run)


def _text_after(entry: Entry, after: int) -> Raw | ChatResponse:
    """The part after `after` of an entry that holds a reply's text from its first character."""
    seq, frame, _ = entry
    text = json.loads(frame)["message"]
    begins = seq - len(text)  # the `seq` before its first character
    if after <= begins:
        return Raw(seq, frame)
    return ChatResponse.tokens(text[after - begins :], seq=seq)


def _merged(run: list[Entry]) -> Iterator[Raw | ChatResponse]:
    if len(run) == 1:  # as published: no need to parse it
        yield Raw(run[0][0], run[0][1])
    elif run:
        text = "".join(json.loads(frame)["message"] for _, frame, _ in run)
        yield ChatResponse.tokens(text, seq=run[-1][0])


def turn_from(entries: list[Entry]) -> TurnRecord | None:
    """Rebuild a turn from the frames of its stream (after its worker died)."""
    record: TurnRecord | None = None
    for seq, text, fields in entries:
        frame = ChatResponse.model_validate(json.loads(text))
        if frame.sender == "you":
            record = TurnRecord(int(fields["t"]), frame.message, echo_seq=seq)
        elif record is None:
            continue
        elif frame.type == "stream":
            if record.text_base is None:
                record.text_base = seq - len(frame.message)
            record.parts.append(frame.message)
        else:
            record.events.append(frame)
            if frame.type == "end":
                record.status = frame.status
    return record


@dataclass(frozen=True)
class Links:
    """A worker's ties to the others: leases and control, the streams its clients follow, and
    the frames of the replies it runs."""

    cluster: Cluster
    tail: Tail
    broadcaster: Broadcaster

    @classmethod
    def of(cls, cluster: Cluster) -> Links:
        return cls(cluster, Tail(cluster), Broadcaster(cluster))

    async def start(self) -> None:
        await self.cluster.start()
        self.tail.start()
        self.broadcaster.start()

    async def close(self) -> None:
        await self.tail.close()
        await self.broadcaster.close()
        await self.cluster.close()


class Follower:
    """A client of this worker following a conversation: it is sent each `seq` once, in order,
    the replay of what it missed first."""

    def __init__(self, client: Outbox, after: int) -> None:
        self.client = client
        self.last = after
        # Live entries that came while the replay was read; None once caught up.
        self.waiting: list[Entry] | None = []
        self.catching_up: asyncio.Task[None] | None = None

    def take(self, entries: list[Entry]) -> None:
        if self.waiting is not None:
            self.waiting.extend(entries)
            return
        fresh = []
        last = self.last
        for entry in entries:  # the tail and a catch-up may both bring an entry
            if entry[0] > last:
                fresh.append(entry)
                last = entry[0]
        if fresh:
            for frame in replayed(fresh, self.last):
                self.client.send(frame)
            self.last = last

    def caught_up(self, frames: list[ChatResponse | Raw]) -> None:
        self.client.preload(frames)
        self.last = max([self.last, *(frame.seq or 0 for frame in frames)])
        waiting, self.waiting = self.waiting or [], None
        self.take(waiting)


class ClusterConversation(Conversation):
    """A `Conversation` whose reply may run on any worker, and whose clients may be on any."""

    def __init__(
        self,
        conversation_id: str,
        services: Services,
        links: Links,
        record: ConversationRecord | None = None,
        owner: str = "",
    ) -> None:
        super().__init__(conversation_id, services, record, owner)
        self.cluster = links.cluster
        self.tail = links.tail
        self.broadcaster = links.broadcaster
        self._followers: dict[Outbox, Follower] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # Whether the stream's latest turn has not ended, as far as this worker has read.
        self._turn_open = False
        self._publisher: Publisher | None = None
        # A finished reply publishing its last frames and giving the lease back.
        self._letting_go: asyncio.Task[None] | None = None
        # Telling every worker about a new conversation's id (see `announce`).
        self._announcing: asyncio.Task[None] | None = None

    @property
    def replying(self) -> bool:
        """A reply runs here, or has ended but still holds the lease."""
        return super().replying or self._letting_go is not None

    # Frames: published, and fed back to clients from the stream.

    def emit(self, frame: ChatResponse) -> None:
        self.seq += 1
        frame.seq = self.seq
        if self._publisher is not None:
            self._publisher.send(frame)
        else:  # the reset acknowledgement of a conversation nothing ran in yet
            self._spawn(self._publish_alone(frame))

    def deliver_token(self, text: str, seq: int) -> None:
        if self._publisher is not None:
            self._publisher.token(text, seq)

    async def _publish_alone(self, frame: ChatResponse) -> None:
        assert frame.seq is not None
        with contextlib.suppress(*SHARED_STATE_ERRORS):
            entry = (frame.seq, frame.to_json(), frame.type)
            await self.cluster.publish(self.id, [entry], 0, fresh=True)
            await self.cluster.set_last_seq(self.id, frame.seq)

    def announce(self) -> None:
        """Make a new conversation's id, and whose it is, known to every worker."""
        self._announcing = asyncio.create_task(self._announce(), name=f"announce-{self.id}")

    async def _announce(self) -> None:
        try:
            await self.cluster.announce(self.id, self.owner)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot make a new conversation known to the other workers (%s)", exc)

    async def join(self, client: Outbox, after: int) -> None:
        if self._announcing is not None:
            # A client learns the id from what it is sent once this returns, and may join on
            # another worker at once: that worker must know the id by then.
            await asyncio.shield(self._announcing)
        # Live entries wait behind the replay; whatever both bring is sent once (by `seq`).
        follower = Follower(client, after)
        self._followers[client] = follower
        self.clients.add(client)
        if len(self._followers) == 1:
            self.tail.follow(self.id, after, self._on_entries)
            self._watchdog = asyncio.create_task(self._watch_runner(), name=f"watch-{self.id}")
        follower.catching_up = asyncio.create_task(
            self._catch_up(follower), name=f"catch-up-{self.id}"
        )
        with contextlib.suppress(*SHARED_STATE_ERRORS):
            await self.cluster.watch([self.id])

    def leave(self, client: Outbox) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        follower = self._followers.pop(client, None)
        if follower is not None and follower.catching_up is not None:
            follower.catching_up.cancel()
        if not self.clients:
            self._stop_following()
            self._spawn(self._left_here(forget=not self.stored))
            if not self.replying:
                self.services.on_idle(self)

    async def _left_here(self, forget: bool) -> None:
        """Tell the other workers this one has no client of the conversation any more."""
        try:
            await self.cluster.unwatch(self.id)
            if forget:
                # An id nothing was asked in is not kept (if a client elsewhere still has it,
                # it goes on working; only new joins are refused).
                await self.cluster.forget_unused(self.id)
        except SHARED_STATE_ERRORS as exc:
            # Harmless: this worker's mark expires within `WATCH_TTL`, an unused id in an hour.
            log.warning("cannot tell the other workers a conversation's clients left (%s)", exc)

    async def reply_in_flight(self) -> int | None:
        local = await super().reply_in_flight()
        if local is not None:
            return local
        try:
            entries = await self.cluster.whole_turn(self.id)
        except SHARED_STATE_ERRORS as exc:
            raise ChatError("unavailable", UNREACHABLE) from exc
        # The stream holds the latest turn, from its question said back (or only a reset's
        # acknowledgement, which is no turn).
        if not entries or entries[0][2].get("k") == "info":
            return None
        if any(fields.get("k") == "end" for _, _, fields in entries):
            return None
        return entries[0][0] - 1

    def close_all(self, code: int, reason: str) -> list[Outbox]:
        for follower in self._followers.values():
            if follower.catching_up is not None:
                follower.catching_up.cancel()
        self._followers.clear()
        self._stop_following()
        return super().close_all(code, reason)

    def _stop_following(self) -> None:
        self.tail.unfollow(self.id)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_entries(self, entries: list[Entry]) -> None:
        """New entries of the stream, from the worker's tail: to every follower, once."""
        self._turn_open = entries[-1][2].get("k") not in (None, "end")
        for follower in tuple(self._followers.values()):
            try:
                follower.take(entries)
            except ClientGone:
                self.leave(follower.client)

    async def _catch_up(self, follower: Follower) -> None:
        """Replay what the follower missed after its `after`, then let live entries through."""
        while True:
            try:
                frames, ended = await self._replay(follower.last)
                break
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot replay a conversation yet (%s)", exc)
                await asyncio.sleep(0.5)
        follower.catching_up = None
        self._turn_open = not ended
        try:
            follower.caught_up(frames)
        except ClientGone:
            self.leave(follower.client)
            return
        # The tail reads for every follower here: on from where the one furthest behind is.
        self.tail.advance(self.id, min(other.last for other in self._followers.values()))

    async def _watch_runner(self) -> None:
        """While a turn is open, check now and then that a worker still runs it."""
        while True:
            await asyncio.sleep(CHECK_RUNNER_EVERY)
            if not self._turn_open or self._publisher is not None:
                continue
            try:
                if await self.cluster.holder(self.id) is None:
                    await self._recover()
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot check a conversation's reply (%s)", exc)

    async def _replay(self, after: int) -> tuple[list[ChatResponse | Raw], bool]:
        """The stored turns and the stream's turn after `after`, and whether the stream's turn
        has ended."""
        position, entries = await self.cluster.turn_frames(self.id, after)
        record = await self.services.writer.store.load(self.id)
        frames: list[ChatResponse | Raw] = []
        if record is not None:
            for turn in record.turns:
                # The stream has the latest turn, with its own frame boundaries; a copy of it
                # stored mid-reply (read here after a stream not yet begun) is not used.
                if (position is None and turn.status is not None) or (
                    position is not None and turn.position < position
                ):
                    frames.extend(turn.frames_after(after))
        frames.extend(replayed(entries, after))
        ended = position is None or (bool(entries) and entries[-1][2].get("k") == "end")
        if position is not None and not entries:
            ended = not await self._turn_in_flight()
        return frames, ended

    async def _turn_in_flight(self) -> bool:
        last = await self.cluster.whole_turn(self.id)
        return bool(last) and last[-1][2].get("k") not in (None, "end", "info")

    # Acting on the conversation: whoever is asked takes the lease.

    async def ask(self, question: str, who: str) -> None:
        await self._run_turn(question, who)

    async def regenerate(self, who: str) -> bool:
        return await self._run_turn(None, who)

    async def _run_turn(self, question: str | None, who: str) -> bool:
        quotas = self.services.quotas
        # The quotas are read from Redis while the lease is taken, but nothing is stopped, here
        # or on another worker, until they have said yes.
        checking = asyncio.ensure_future(quotas.check(who))
        try:
            async with self._lock:
                if self.replying:
                    await checking
                await self._interrupt()  # a reply of ours gives the lease back as it ends
                if self._letting_go is not None:
                    await self._letting_go
                try:
                    await self._take_over(checking)
                except SHARED_STATE_ERRORS as exc:
                    raise ChatError("unavailable", UNREACHABLE) from exc
                return await self._start_turn(question, who, checking)
        finally:
            if not checking.done():
                checking.cancel()
            elif not checking.cancelled():
                checking.exception()  # raised above, or moot: the turn failed before it

    async def _start_turn(
        self, question: str | None, who: str, checking: asyncio.Future[None]
    ) -> bool:
        """With the lease held: the quotas' answer, then the turn, or the lease given back."""
        quotas = self.services.quotas
        held: Held | None = None
        try:
            await checking
            # The reply's slot is taken while the conversation is read from the store.
            loaded, admitted = await asyncio.gather(
                self._load(), quotas.begin_reply(who), return_exceptions=True
            )
            if isinstance(admitted, BaseException):
                raise admitted
            held = admitted
            if isinstance(loaded, BaseException):
                raise loaded
            if question is None and not self.turns:
                await quotas.end_reply(held, None)
                await self.cluster.give_back(self.id)
                return False
            if question is None:
                record = self.turns[-1]
                record.restart()
                first = [ChatResponse.echo(record.question, seq=record.echo_seq)]
            else:
                if self.title is None:
                    self.title = title_for(question)
                    self.created_at = now()
                self.seq += 1
                record = TurnRecord(len(self.turns), question, echo_seq=self.seq)
                self.turns.append(record)
                first = [ChatResponse.echo(question, seq=record.echo_seq)]
            self.updated_at = now()
            self._publisher = self.broadcaster.publisher(
                self.id,
                record.position,
                record.echo_seq,
                lambda: self._so_far(record),
                self._taken_over,
            )
            for frame in first:
                self._publisher.send(frame)
            self._start(record, regenerate=question is None, held=held)
        except BaseException:
            await quotas.end_reply(held, None)
            await self._let_go()
            raise
        return True

    async def _take_over(self, first: Awaitable[None]) -> None:
        """Hold the lease, stopping the reply another worker runs if need be, once `first`
        (the quotas' answer) has come."""
        deadline = time.monotonic() + TAKE_OVER_WITHIN
        asked = 0.0
        while not await self.cluster.acquire(self.id):
            # Asked again now and then: the holder may not have started its reply yet.
            if time.monotonic() - asked > ASK_AGAIN_AFTER:
                await first
                await self.cluster.stop_elsewhere(self.id)
                asked = time.monotonic()
            if time.monotonic() > deadline:
                raise ChatError("unavailable", "Another worker did not give up this conversation.")
            await asyncio.sleep(0.005)
        self.cluster.hold(self.id, self._lease_lost)

    async def _load(self) -> None:
        """The conversation as stored, and the last `seq` anyone used: the lease is ours now."""
        record = await self.services.writer.store.load(self.id)
        if record is not None:
            self.turns = record.turns
            self.title = record.title
            self.created_at = record.created_at
        self.seq = max(record.last_seq if record else 0, await self.cluster.last_seq(self.id))

    async def _run(
        self, record: TurnRecord, history: History, regenerate: bool, held: Held | None
    ) -> None:
        keeper = asyncio.create_task(self._mind_the_grace(), name=f"grace-{self.id}")
        try:
            await super()._run(record, history, regenerate, held)
        finally:
            keeper.cancel()
            # Not cut short by a question that pre-empts the reply: that question waits for it.
            self._letting_go = asyncio.create_task(self._let_go(), name=f"let-go-{self.id}")
            await asyncio.shield(self._letting_go)

    async def _let_go(self) -> None:
        """Publish what is left, store the turn, then give up the lease."""
        publisher, self._publisher = self._publisher, None
        try:
            if publisher is not None:
                await publisher.drain()
            with contextlib.suppress(Exception):
                await self.services.writer.flush()
            with contextlib.suppress(*SHARED_STATE_ERRORS):
                await self.cluster.set_last_seq(self.id, self.seq)
            with contextlib.suppress(*SHARED_STATE_ERRORS):
                await self.cluster.give_back(self.id)
        finally:
            self.cluster.let_go(self.id)
            if self._letting_go is asyncio.current_task():
                self._letting_go = None
            if not self.clients:
                self.services.on_idle(self)

    def _so_far(self, record: TurnRecord) -> list[StreamEntry] | None:
        """The frames of the turn in flight up to now, to write its stream anew (its text as
        one entry); None for a conversation being deleted, whose stream stays gone."""
        if self.deleted:
            return None
        return [
            (
                frame.seq or 0,
                frame.to_json(),
                TEXT_SO_FAR if frame.type == "stream" and frame.sender == "bot" else frame.type,
            )
            for frame in record.frames_after(0)
        ]

    def _taken_over(self) -> None:
        log.warning("another worker holds a conversation whose reply runs here; stopping it")
        self._spawn(self.stop_here(ChatError("unavailable", TAKEN)))

    def _lease_lost(self) -> None:
        log.warning("another worker took the lease of a conversation mid-reply; stopping it")
        if self._publisher is not None:
            self._publisher.guard()
        self._spawn(self.stop_here(ChatError("unavailable", TAKEN)))

    async def _mind_the_grace(self) -> None:
        """Stop the reply when no client on any worker has watched it for the resume grace."""
        unwatched_since: float | None = None
        grace = self.services.settings.chat_resume_grace
        while True:
            await asyncio.sleep(RENEW_EVERY if grace > RENEW_EVERY else max(grace, 0.05))
            try:
                watched = bool(self.clients) or await self.cluster.watched_elsewhere(self.id)
            except SHARED_STATE_ERRORS:
                continue
            if watched:
                unwatched_since = None
                continue
            unwatched_since = unwatched_since or time.monotonic()
            if time.monotonic() - unwatched_since >= grace:
                log.info("no client came back within the resume grace; reply stopped")
                self._spawn(self.stop())
                return

    async def stop_here(self, because: ChatError | None = None) -> bool:
        stopped = await super().stop_here(because)
        letting_go = self._letting_go
        if letting_go is not None:
            await letting_go
        return stopped

    async def stop(self) -> bool:
        if await self.stop_here():
            return True
        try:
            if not await self.cluster.stop_elsewhere(self.id):
                return False
            await self.cluster.released(self.id, TAKE_OVER_WITHIN)
        except SHARED_STATE_ERRORS as exc:
            raise ChatError("unavailable", UNREACHABLE) from exc
        return True

    async def _recover(self) -> None:
        """The worker running the reply is gone: end the turn as it was, and store it."""
        async with self._lock:  # a question asked meanwhile waits for the turn to be ended
            await self._recover_turn()

    async def _recover_turn(self) -> None:
        # Nothing to end, and the lease left alone, unless the stream has a turn not ended: one
        # that Redis lost is written anew by the worker running it, lease first.
        if not self._open(turn_from(await self.cluster.whole_turn(self.id))):
            return
        if not await self.cluster.acquire(self.id):
            return
        self.cluster.hold(self.id, lambda: None)
        try:
            record = turn_from(await self.cluster.whole_turn(self.id))
            if record is None or not self._open(record):
                return
            log.warning("the worker running a reply died; ending it with the text streamed")
            await self._load()
            error = ChatError("upstream_dropped", DROPPED).frame()
            end = ChatResponse.bot("end", status="error")
            frames = []
            for frame in (error, end):
                self.seq += 1
                frame.seq = self.seq
                record.events.append(frame)
                frames.append((self.seq, frame.to_json(), frame.type))
            record.status = "error"
            await self.cluster.publish(self.id, frames, record.position, fresh=False)
            self.turns[record.position : record.position + 1] = [record]
            self._changed.add(record.position)
            if self.title is None:
                self.title = title_for(record.question)
            await self.services.writer.store.save([r for r in [self.snapshot()] if r is not None])
            await self.cluster.set_last_seq(self.id, self.seq)
        finally:
            await self.cluster.give_back(self.id)

    @staticmethod
    def _open(record: TurnRecord | None) -> bool:
        """Whether a turn read from the stream is there and has not ended."""
        return record is not None and record.status is None

    def frames_after(self, after: int) -> Iterator[ChatResponse]:
        raise NotImplementedError("a shared conversation is replayed from the stream")
