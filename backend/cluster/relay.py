"""The relay of conversations shared by several workers through Redis (see
`backend/cluster/shared.py`).

The worker that receives a question takes the conversation's lease (stopping the reply that
runs elsewhere first, if any), answers it, and publishes every frame to the conversation's
stream (through the worker's one sender, `backend/cluster/publishing.py`). Every client, on
whichever worker, is first caught up (stored turns, then the stream's turn after its `after`)
and then fed from the stream by its worker's one reader (`backend/cluster/tail.py`), each `seq`
once, so a client that joins or rejoins on any worker gets exactly what it missed. Before a
worker gives the lease back it stores the turn, so the database holds every turn but the
latest and the stream holds the latest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Any

from backend.chat.outbox import Outbox, Raw
from backend.chat.relay import Directory
from backend.cluster.publishing import Broadcaster, Publisher
from backend.cluster.shard_tail import ShardTail
from backend.cluster.shared import TEXT, TEXT_SO_FAR, Cluster, Entry, Lease
from backend.cluster.tail import Tail
from backend.config.redis_clients import SharedRedis
from backend.config.timings import (
    CHECK_RUNNER_EVERY,
    DEAD_AFTER,
    RELEASE_WITHIN,
    RENEW_EVERY,
    SWEEP_EVERY,
    TAKE_OVER_WITHIN,
    WATCH_TTL,
)
from backend.protocol.errors import SHARED_STATE_ERRORS, UNREACHABLE, ChatError, ClientGone
from backend.store.records import ConversationRecord, TurnRecord
from schemas import ChatResponse

if TYPE_CHECKING:
    from backend.chat.conversation import Conversation

log = logging.getLogger(__name__)

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
        if entry.kind == TEXT:
            run.append(entry)
            continue
        yield from _merged(run)
        run = []
        if entry.kind == TEXT_SO_FAR:
            yield _text_after(entry, after)
        else:
            yield Raw(entry.seq, entry.frame)
    yield from _merged(run)


def _text_after(entry: Entry, after: int) -> Raw | ChatResponse:
    """The part after `after` of an entry that holds a reply's text from its first character."""
    text = json.loads(entry.frame)["message"]
    begins = entry.seq - len(text)  # the `seq` before its first character
    if after <= begins:
        return Raw(entry.seq, entry.frame)
    return ChatResponse.tokens(text[after - begins :], seq=entry.seq)


def _merged(run: list[Entry]) -> Iterator[Raw | ChatResponse]:
    if len(run) == 1:  # as published: no need to parse it
        yield Raw(run[0].seq, run[0].frame)
    elif run:
        text = "".join(json.loads(entry.frame)["message"] for entry in run)
        yield ChatResponse.tokens(text, seq=run[-1].seq)


def turn_from(entries: list[Entry]) -> TurnRecord | None:
    """Rebuild a turn from the frames of its stream (after its worker died)."""
    record: TurnRecord | None = None
    for entry in entries:
        frame = ChatResponse.model_validate(json.loads(entry.frame))
        if frame.sender == "you":
            record = TurnRecord(
                entry.turn, frame.message, echo_seq=entry.seq, replaces=frame.replaces
            )
        elif record is None:
            continue
        elif frame.type == "stream":
            if record.text_base is None:
                record.text_base = entry.seq - len(frame.message)
            record.parts.append(frame.message)
        else:
            record.events.append(frame)
            if frame.type == "end":
                record.status = frame.status
    return record


def entries_of(record: TurnRecord) -> list[Entry]:
    """A turn's frames as stream entries, its text as one (to write its stream anew)."""
    return [
        Entry(
            frame.seq or 0,
            frame.to_json(),
            TEXT_SO_FAR if frame.type == "stream" and frame.sender == "bot" else frame.type,
            record.position,
        )
        for frame in record.frames_after(0)
    ]


class RedisRelays:
    """A worker's ties to the others: leases and control, the streams its clients follow, and
    the frames of the replies it runs. Makes each conversation's `RedisRelay`."""

    shared = True

    def __init__(
        self,
        cluster: Cluster,
        tail: Tail | ShardTail | None = None,
        broadcaster: Broadcaster | None = None,
    ) -> None:
        self.cluster = cluster
        self.tail = tail or (ShardTail(cluster) if cluster.sharded else Tail(cluster))
        self.broadcaster = broadcaster or Broadcaster(cluster)
        self._directory: Directory | None = None
        self._watching: asyncio.Task[None] | None = None
        self._sweeping: asyncio.Task[None] | None = None

    @property
    def redis(self) -> SharedRedis:
        """The client the worker's other shared state (quotas, tickets) uses."""
        return self.cluster.redis

    def relay(self, conversation: Conversation) -> RedisRelay:
        return RedisRelay(conversation, self)

    async def start(self, directory: Directory) -> None:
        """Connect (and fail here if Redis cannot be reached) and start following."""
        self._directory = directory
        self.cluster.on_control(self._on_control)
        await self.cluster.start()
        self.tail.start()
        self.broadcaster.start()
        self._watching = asyncio.create_task(self._keep_watching(directory), name="watching")
        self._sweeping = asyncio.create_task(self._sweep(directory), name="sweeping")

    async def close(self) -> None:
        for task in (self._watching, self._sweeping):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        await self.tail.close()
        await self.broadcaster.close()
        await self.cluster.close()

    async def ping(self) -> None:
        await self.cluster.ping()

    async def running(self, conversation_id: str) -> bool:
        """Whether a worker runs the conversation's turn, or will end it from its stream."""
        return await self.cluster.running(conversation_id)

    async def begun_elsewhere(self, conversation_id: str) -> tuple[str, str | None] | None:
        """The owner and assistant of a conversation another worker has begun and the store
        may not have yet; None if no worker has."""
        return await self.cluster.known(conversation_id)

    async def latest_turn(self, conversation_id: str) -> TurnRecord | None:
        """The turn a worker is streaming (or just ended), which reaches the store a moment
        later."""
        return turn_from(await self.cluster.whole_turn(conversation_id))

    async def forget(self, conversation_id: str) -> None:
        """Every worker drops the conversation and stops its reply, which then writes nothing
        more."""
        await self.cluster.forget(conversation_id)
        await self.cluster.released(conversation_id, RELEASE_WITHIN)

    async def give_back_all(self) -> None:
        """No lease here is for anything any more: give them back (a draining worker)."""
        try:
            await self.cluster.give_back_all()
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot give back this worker's leases (%s)", exc)

    async def _on_control(self, conversation_id: str, command: str) -> None:
        """A message from another worker about a conversation."""
        if self._directory is None:
            return
        conversation = self._directory.live(conversation_id)
        if conversation is None:
            return
        if command == "stop":
            conversation.background(conversation.stop_here())
        elif command == "deleted":
            self._directory.deleted_elsewhere(conversation_id)

    async def _sweep(self, directory: Directory) -> None:
        """Every few seconds, store the turns of workers that died running them (from their
        streams): the store has a turn once it ends, not as it grows."""
        while True:
            await asyncio.sleep(SWEEP_EVERY * random.uniform(0.5, 1.5))
            try:
                for worker in await self.cluster.dead_workers(DEAD_AFTER):
                    conversations = await self.cluster.claim_turns_of(worker)
                    if conversations is None:
                        continue  # another worker recovers them
                    for conversation_id in conversations:
                        try:
                            # One that cannot be recovered does not hold up the others.
                            async with asyncio.timeout(TAKE_OVER_WITHIN):
                                await directory.recover(conversation_id)
                        except Exception:
                            log.exception("cannot recover a turn of a worker that died")
                    await self.cluster.recovered(worker)
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot look for workers that died (%s)", exc)

    async def _keep_watching(self, directory: Directory) -> None:
        """Tell the other workers, every few seconds, which conversations have clients here."""
        while True:
            watched = directory.watched()
            if watched:
                try:
                    await self.cluster.watch(watched)
                except SHARED_STATE_ERRORS as exc:
                    log.warning("cannot say which conversations have clients here (%s)", exc)
            await asyncio.sleep(WATCH_TTL / 3)


class Follower:
    """A client of this worker following a conversation: it is sent each `seq` once, in order,
    the replay of what it missed first."""

    def __init__(self, client: Outbox, after: int) -> None:
        self.client = client
        self.last = after
        # Live entries that came while the replay was read; None once caught up.
        self.waiting: list[Entry] | None = []
        self.catching_up: asyncio.Task[None] | None = None

    def take(self, entries: list[Entry], look_for_gaps: bool = True) -> bool:
        """Send the entries not sent yet. True if, instead, they begin a turn after frames this
        client was not sent (its stream written anew for that turn before they were read): a
        catch-up is due, and they wait for it."""
        if self.waiting is not None:
            self.waiting.extend(entries)
            return False
        if look_for_gaps and self._after_a_gap(entries):
            self.waiting = list(entries)
            return True
        fresh = []
        last = self.last
        for entry in entries:  # the tail and a catch-up may both bring an entry
            if entry.seq > last:
                fresh.append(entry)
                last = entry.seq
        if fresh:
            for frame in replayed(fresh, self.last):
                self.client.send(frame)
            self.last = last
        return False

    def _after_a_gap(self, entries: list[Entry]) -> bool:
        last = self.last
        for entry in entries:
            # A question said back is its turn's first frame, numbered right after the frames
            # before it.
            if entry.kind == "stream" and entry.seq - 1 > last:
                return True
            last = max(last, entry.seq)
        return False

    def caught_up(self, frames: list[ChatResponse | Raw]) -> None:
        self.client.preload(frames)
        self.last = max([self.last, *(frame.seq or 0 for frame in frames)])
        waiting, self.waiting = self.waiting or [], None
        # What the catch-up could not find is nowhere to be found: no looking for it again.
        self.take(waiting, look_for_gaps=False)


class RedisRelay:
    """The relay of a conversation whose reply may run on any worker, and whose clients may be
    on any."""

    recheck_every: float | None = RENEW_EVERY
    # A turn in flight is in its stream: the store is written once it ends.
    keeps_live_turn = True

    def __init__(self, conversation: Conversation, relays: RedisRelays) -> None:
        self.conversation = conversation
        self.id = conversation.id
        self.cluster = relays.cluster
        self.tail = relays.tail
        self.broadcaster = relays.broadcaster
        self._followers: dict[Outbox, Follower] = {}
        self._watchdog: asyncio.Task[None] | None = None
        # Whether the stream's latest turn has not ended, as far as this worker has read.
        self._turn_open = False
        self._publisher: Publisher | None = None
        self._lease: Lease | None = None
        # The store's copy, read while the lease was being taken (see `_take_over`).
        self._prefetched: asyncio.Future[ConversationRecord | None] | None = None
        # Telling every worker about a new conversation's id (see `announce`).
        self._announcing: asyncio.Task[None] | None = None
        # Publishing a frame outside any turn (see `send`): the next turn waits for it.
        self._alone: asyncio.Task[None] | None = None
        # A conversation made here whose first client has not joined: nothing to catch up on.
        self._fresh = False
        # A conversation made here (see `_load`).
        self._made_here = False
        # The publisher of the reply this worker runs, while it hands the frames it wrote to
        # the stream straight to the clients here rather than have the tail read them back:
        # from the turn's beginning until it is given back (or taken over).
        self._local: Publisher | None = None

    def __repr__(self) -> str:
        return f"<RedisRelay {self.id}: {len(self._followers)} following, {self._lease!r}>"

    # Frames: published, and fed back to clients from the stream.

    def send(self, frame: ChatResponse) -> None:
        if self._publisher is not None:
            self._publisher.send(frame)
        else:  # the reset acknowledgement of a conversation nothing ran in yet
            self._alone = asyncio.create_task(self._publish_alone(frame), name=f"alone-{self.id}")

    def token(self, text: str, seq: int) -> None:
        if self._publisher is not None:
            self._publisher.token(text, seq)

    async def _publish_alone(self, frame: ChatResponse) -> None:
        """Publish a frame outside any turn; the clients here have it once the stream does."""
        seq = frame.seq or 0
        entry = Entry(seq, frame.to_json(), frame.type, 0)
        try:
            await self.cluster.publish(self.id, [entry], True)
            await self.cluster.set_last_seq(self.id, seq)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot publish a frame of a conversation at rest (%s)", exc)
            return
        self._on_entries([entry])

    # Clients.

    def announce(self) -> None:
        self._fresh = self._made_here = True
        self._announcing = asyncio.create_task(self._announce(), name=f"announce-{self.id}")

    async def _announce(self) -> None:
        try:
            conversation = self.conversation
            # Said with the client it is being handed to watching it here (see `join`).
            await self.cluster.announce(
                self.id, conversation.owner, conversation.assistant, watched=True
            )
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot make a new conversation known to the other workers (%s)", exc)

    async def join(self, client: Outbox, after: int) -> None:
        if self._announcing is not None:
            # A client learns the id from what it is sent once this returns, and may join on
            # another worker at once: that worker must know the id by then.
            await asyncio.shield(self._announcing)
        follower = Follower(client, after)
        self._followers[client] = follower
        first = len(self._followers) == 1
        if first:
            self._watchdog = asyncio.create_task(self._watch_runner(), name=f"watch-{self.id}")
        if first and self._local is None:
            self.tail.follow(self.id, after, self._on_entries)
        # Only while nothing is numbered in it yet: a turn may have begun before its first
        # client joined (a question asked over HTTP), and its frames are in the stream.
        fresh = self._fresh and self.conversation.seq == 0
        self._fresh = False
        if fresh:
            # An id made here, that nobody else has had yet: nothing to catch up on, and said
            # watched with the id (`announce`).
            follower.caught_up([])
            return
        # Live entries wait behind the replay; whatever both bring is sent once (by `seq`).
        self._start_catch_up(follower)
        try:
            await self.cluster.watch([self.id])
        except SHARED_STATE_ERRORS as exc:  # said again within `WATCH_TTL / 3`
            log.warning("cannot say a conversation has a client here (%s)", exc)

    def leave(self, client: Outbox, last: bool) -> None:
        follower = self._followers.pop(client, None)
        if follower is not None and follower.catching_up is not None:
            follower.catching_up.cancel()
        if last:
            self._stop_following()
            self.conversation.background(self._left_here(forget=not self.conversation.stored))

    def close_all(self) -> None:
        for follower in self._followers.values():
            if follower.catching_up is not None:
                follower.catching_up.cancel()
        self._followers.clear()
        self._stop_following()

    async def watched_elsewhere(self) -> bool:
        try:
            return await self.cluster.watched_elsewhere(self.id)
        except SHARED_STATE_ERRORS:
            return True  # cannot tell: the reply is kept until it can

    async def reply_elsewhere(self) -> int | None:
        try:
            entries = await self.cluster.whole_turn(self.id)
        except SHARED_STATE_ERRORS as exc:
            raise ChatError("unavailable", UNREACHABLE) from exc
        # The stream holds the latest turn, from its question said back (or only a reset's
        # acknowledgement, which is no turn).
        if not entries or entries[0].kind == "info":
            return None
        if any(entry.ends_turn for entry in entries):
            return None
        return entries[0].seq - 1

    async def last_seq(self) -> int:
        return await self.cluster.last_seq(self.id)

    async def turns_elsewhere(self) -> int:
        if self._fresh:
            return 0  # made here, and nobody else has had its id yet
        try:
            position = await self.cluster.latest_position(self.id)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot read how many turns a conversation has (%s)", exc)
            return 0
        return 0 if position is None else position + 1

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

    def _stop_following(self) -> None:
        self.tail.unfollow(self.id)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_entries(self, entries: list[Entry]) -> None:
        """New entries of the stream, from the worker's tail: to every follower, once."""
        self._turn_open = not entries[-1].ends_turn
        for follower in tuple(self._followers.values()):
            try:
                if follower.take(entries):
                    self._start_catch_up(follower)
            except ClientGone:
                self.conversation.leave(follower.client)

    def _start_catch_up(self, follower: Follower) -> None:
        follower.catching_up = asyncio.create_task(
            self._catch_up(follower), name=f"catch-up-{self.id}"
        )

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
            self.conversation.leave(follower.client)
            return
        # The tail reads for every follower here: on from where the one furthest behind is.
        self.tail.advance(self.id, min(other.last for other in self._followers.values()))

    async def _replay(self, after: int) -> tuple[list[ChatResponse | Raw], bool]:
        """The stored turns and the stream's turn after `after`, and whether the stream's turn
        has ended."""
        position, entries = await self.cluster.turn_frames(self.id, after)
        record = await self.conversation.services.writer.store.load(self.id)
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
        ended = position is None or (bool(entries) and entries[-1].ends_turn)
        if position is not None and not entries:
            ended = not await self._turn_in_flight()
        return frames, ended

    async def _turn_in_flight(self) -> bool:
        last = await self.cluster.whole_turn(self.id)
        return bool(last) and last[-1].kind not in ("end", "info")

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

    # The turn: whoever is asked takes the lease.

    async def hold(self, admitted: Awaitable[None]) -> None:
        try:
            await self._take_over(admitted)
        except SHARED_STATE_ERRORS as exc:
            raise ChatError("unavailable", UNREACHABLE) from exc

    async def _take_over(self, admitted: Awaitable[None]) -> None:
        """Hold the lease, stopping the reply another worker runs if need be, once `admitted`
        (the quotas' answer) has come."""
        # The store is read while the lease is taken: the first token waits for one round
        # trip, not two (`_load` reads it again if it was read before the last turn was in).
        if self._alone is not None:
            # Its frame goes to the stream, and to the clients here, before the turn's do.
            await asyncio.shield(self._alone)
            self._alone = None
        store = self.conversation.services.writer.store
        if not (self._made_here and self.conversation.seq == 0):
            self._prefetched = asyncio.ensure_future(store.load(self.id))
            self._prefetched.add_done_callback(_observed)
        lease = self.cluster.lease(self.id, self._lease_lost)
        deadline = time.monotonic() + TAKE_OVER_WITHIN
        asked = 0.0
        while not await lease.acquire():
            # Asked again now and then: the holder may not have started its reply yet.
            if time.monotonic() - asked > ASK_AGAIN_AFTER:
                await admitted
                await self.cluster.stop_elsewhere(self.id)
                asked = time.monotonic()
            if time.monotonic() > deadline:
                raise ChatError("unavailable", "Another worker did not give up this conversation.")
            await asyncio.sleep(0.005)
        self._lease = lease

    def load(self) -> Awaitable[None]:
        return self._load()

    async def _load(self) -> None:
        """The conversation as stored, and the last `seq` anyone used: the lease is ours now."""
        conversation = self.conversation
        store = conversation.services.writer.store
        prefetched, self._prefetched = self._prefetched, None
        lease = self._lease
        seen = lease.seen if lease is not None else None
        if seen is None:
            record, (stored, streamed) = await asyncio.gather(
                store.load(self.id), self.cluster.last_seqs(self.id)
            )
        elif prefetched is None and self._made_here and lease is not None and lease.untouched:
            # Made here, and nobody has asked anything in it since: nothing to read.
            record, stored, streamed = None, 0, 0
        else:
            stored, streamed = seen
            record = await (prefetched if prefetched is not None else store.load(self.id))
            if (record.last_seq if record is not None else 0) < stored:
                # Read before the worker that held the lease last had stored its turn (or
                # the conversation's first row): read again, now that it is in.
                record = await store.load(self.id)
        if record is not None:
            conversation.turns = record.turns
            conversation.title = record.title
            conversation.created_at = record.created_at
            conversation.assistant = record.assistant or conversation.assistant
        # Never below what this worker numbered itself (a frame published outside any turn).
        conversation.seq = max(conversation.seq, record.last_seq if record else 0, stored, streamed)

    def begin(self, record: TurnRecord, regenerate: bool) -> None:
        self._publisher = self.broadcaster.publisher(
            self.id,
            record.position,
            record.echo_seq,
            lambda: None if self.conversation.deleted else entries_of(record),
            self._taken_over,
        )
        self._catch_up_those_behind(record)
        # What is written to the stream goes to the clients here as it is written.
        self._local = self._publisher
        self._publisher.delivered = self._on_entries
        self.tail.unfollow(self.id)
        if regenerate:
            # A turn's stream begins with its question said back, a regenerated one's too
            # (its clients have that frame already).
            self._publisher.send(ChatResponse.echo(record.question, seq=record.echo_seq))

    def _catch_up_those_behind(self, record: TurnRecord) -> None:
        """Clients here that the tail has not given every frame before this turn's yet (the
        turn before ran elsewhere) are caught up from the store, where that turn is now, and
        the stream: the tail stops reading the stream for them as the turn begins."""
        seq = self.conversation.seq
        # The turn's question said back is numbered already, unless it is regenerated.
        before = record.echo_seq - 1 if record.echo_seq == seq else seq
        for follower in self._followers.values():
            if follower.waiting is None and follower.last < before:
                follower.waiting = []
                self._start_catch_up(follower)

    def _feed_from_stream(self) -> None:
        """Clients here are fed by the tail again, from where each is."""
        local, self._local = self._local, None
        if local is None:
            return
        local.delivered = None
        if self._followers:
            after = min(follower.last for follower in self._followers.values())
            self.tail.follow(self.id, after, self._on_entries)

    async def release(self) -> None:
        """Publish what is left, store the turn, then give the lease back."""
        publisher, self._publisher = self._publisher, None
        lease, self._lease = self._lease, None
        if lease is None:
            return
        async with lease:
            if publisher is not None:
                await publisher.drain()
            self._feed_from_stream()
            stored = True
            try:
                await self.conversation.services.writer.flush()
            except Exception:
                # The writer keeps it and tries again at its next tick (and should this
                # worker die first, another stores it from the stream).
                log.exception("cannot store a turn before giving its conversation back")
                stored = False
            try:
                if stored:
                    await self.cluster.turn_stored(self.id, self.conversation.seq, lease)
                else:
                    await self.cluster.set_last_seq(self.id, self.conversation.seq)
            except SHARED_STATE_ERRORS as exc:  # the stream has it too, while it lives
                log.warning("cannot record a conversation's last seq (%s)", exc)

    async def stop_elsewhere(self) -> bool:
        try:
            if not await self.cluster.stop_elsewhere(self.id):
                return False
            await self.cluster.released(self.id, TAKE_OVER_WITHIN)
        except SHARED_STATE_ERRORS as exc:
            raise ChatError("unavailable", UNREACHABLE) from exc
        return True

    def _taken_over(self) -> None:
        log.warning("another worker holds a conversation whose reply runs here; stopping it")
        self._feed_from_stream()
        self._stop_here(ChatError("unavailable", TAKEN))

    def _lease_lost(self) -> None:
        log.warning("another worker took the lease of a conversation mid-reply; stopping it")
        if self._publisher is not None:
            self._publisher.guard()
        self._feed_from_stream()
        self._stop_here(ChatError("unavailable", TAKEN))

    def _stop_here(self, because: ChatError) -> None:
        conversation = self.conversation
        conversation.background(conversation.stop_here(because))

    async def _recover(self) -> None:
        """The worker running the reply is gone: end the turn as it was, and store it."""
        # A question asked meanwhile waits for the turn to be ended.
        async with self.conversation.turn_lock:
            await self._recover_turn()

    async def recover(self) -> None:
        """A worker that ran a turn here died before it stored the turn: end it if it had not
        ended, and store it as the stream has it."""
        async with self.conversation.turn_lock:
            await self._recover_turn()
            await self._store_ended_turn()

    async def _store_ended_turn(self) -> None:
        """Store the stream's ended turn if the store does not have it as it ended."""
        record = turn_from(await self.cluster.whole_turn(self.id))
        if record is None or record.status is None:
            return
        lease = self.cluster.lease(self.id)
        if not await lease.acquire():
            return  # a worker runs the conversation: it stores what it does
        async with lease:
            stored = await self.conversation.services.writer.store.load(self.id)
            kept = (
                next((turn for turn in stored.turns if turn.position == record.position), None)
                if stored
                else None
            )
            if kept is not None and kept.status == record.status and kept.text == record.text:
                return
            log.warning("a worker died before it stored a turn; stored from the stream")
            await self._load()
            await self._store_now(record)

    async def _recover_turn(self) -> None:
        # Nothing to end, and the lease left alone, unless the stream has a turn not ended: one
        # that Redis lost is written anew by the worker running it, lease first.
        if not _open(turn_from(await self.cluster.whole_turn(self.id))):
            return
        lease = self.cluster.lease(self.id)
        if not await lease.acquire():
            return
        async with lease:
            record = turn_from(await self.cluster.whole_turn(self.id))
            if record is None or not _open(record):
                return
            log.warning("the worker running a reply died; ending it with the text streamed")
            await self._load()
            conversation = self.conversation
            entries = []
            for frame in (
                ChatError("upstream_dropped", DROPPED).frame(),
                ChatResponse.bot("end", status="error"),
            ):
                conversation.seq += 1
                frame.seq = conversation.seq
                record.events.append(frame)
                entries.append(Entry(frame.seq, frame.to_json(), frame.type, record.position))
            record.status = "error"
            await self.cluster.publish(self.id, entries, fresh=False)
            await self._store_now(record)
            await self.cluster.set_last_seq(self.id, conversation.seq)

    async def _store_now(self, record: TurnRecord) -> None:
        """Take `record`, read from the stream, as the conversation's turn, and store it now."""
        conversation = self.conversation
        conversation.adopt(record)
        snapshot = conversation.snapshot()
        if snapshot is not None:
            await conversation.services.writer.store.save([snapshot])


def _observed(read: asyncio.Future[Any]) -> None:
    """A read nobody may wait for (its turn was not taken): its failure is not left unseen."""
    if not read.cancelled():
        read.exception()


def _open(record: TurnRecord | None) -> bool:
    """Whether a turn read from the stream is there and has not ended."""
    return record is not None and record.status is None
