"""What the workers of one deployment share through Redis: live frames, leases, control.

- **Frames** of a conversation's latest turn go to a Redis Stream whose entry ids are
  `SEQ-0`, so "everything after `seq` N" is `XRANGE (N-0 +` / `XREAD` from `N-0`, on any
  worker. Earlier turns are in the database: a turn is stored before the next one replaces the
  stream.
- **A lease** (`SET NX PX`, renewed while the reply runs) says which worker runs a
  conversation's reply; there is never more than one. A worker that dies loses it within
  `LEASE_MS`.
- **Control** messages (`stop`, `deleted`) go over pub/sub to whichever worker acts on them.
- **Watchers**: each worker with clients of a conversation keeps its entry in a sorted set
  fresh, so the resume grace counts clients on every worker.

Every key of a conversation carries its id as a hash tag (`chat:{ID}:frames`), so on a Redis
Cluster they all live in one slot, where the scripts and transactions that touch several of
them at once can run. On a cluster, new entries are also sent on the conversation's shard
channel (`SPUBLISH`), which followers listen to (`backend/cluster/shard_tail.py`): a blocking
read over many streams cannot span slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from backend.config.redis_clients import (
    ScriptClient,
    SharedRedis,
    is_cluster,
    open_cluster,
    redis_options,
    run_script,
)
from backend.config.timings import LEASE_MS, RENEW_EVERY, STREAM_TTL_S, WATCH_TTL
from backend.protocol.errors import SHARED_STATE_ERRORS

log = logging.getLogger(__name__)

CONTROL_PATTERN = "chat:control:*"
# Every worker's last sign of life (a sorted set: worker -> time), said every `RENEW_EVERY` s.
WORKERS = "chat:workers"
# Connections a worker opens to Redis at most (blocking reads have their own), and how long
# a request waits for one before it fails.
REDIS_CONNECTIONS = 32
REDIS_WAIT_S = 5.0

# Renew a lease this worker holds (1), or take it again if nobody holds it (2): Redis lost it
# (a restart) or let it expire (cut off for longer than the lease) while the reply ran on. Not
# if another worker has ended the turn meanwhile, taking this one for dead (0).
RENEW_LEASE = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
local last = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  local fields = last[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'k' and fields[i + 1] == 'end' then
      return 0
    end
  end
end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return 2
"""
RENEWED, RETAKEN = 1, 2
# Release a lease only if this worker still holds it.
RELEASE_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

# Write a turn's stream anew, from its first frame, if the lease is this worker's or nobody's
# (then taking it): a stream that Redis lost while its reply ran on. ARGV: worker, lease ms,
# turn position, seconds the stream lives, then each entry's id, frame and kind.
RESTORE_TURN = """
local holder = redis.call('get', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
redis.call('del', KEYS[2])
for i = 5, #ARGV, 3 do
  redis.call('xadd', KEYS[2], ARGV[i], 'f', ARGV[i + 1], 't', ARGV[3], 'k', ARGV[i + 2])
end
redis.call('expire', KEYS[2], ARGV[4])
return 1
"""

# Add a reply's last frames to its turn's stream only while the stream still holds that turn
# (its first entry's id and position), not ended and with nothing past them: another worker may
# have taken the conversation over. KEYS: the stream. ARGV: the turn's position, its first id,
# then each entry's id, frame and kind.
APPEND_TO_TURN = """
local first = redis.call('xrange', KEYS[1], '-', '+', 'COUNT', 1)[1]
if not first or first[1] ~= ARGV[2] then
  return 0
end
local last = redis.call('xrevrange', KEYS[1], '+', '-', 'COUNT', 1)[1]
local function field(entry, name)
  for i = 1, #entry[2], 2 do
    if entry[2][i] == name then
      return entry[2][i + 1]
    end
  end
end
if field(first, 't') ~= ARGV[1] or field(last, 'k') == 'end' then
  return 0
end
local function seq(id)
  return tonumber(string.match(id, '^%d+'))
end
if seq(ARGV[3]) <= seq(last[1]) then
  return 0
end
for i = 3, #ARGV, 3 do
  redis.call('xadd', KEYS[1], ARGV[i], 'f', ARGV[i + 1], 't', ARGV[1], 'k', ARGV[i + 2])
end
return 1
"""

# Only a conversation that never had a frame: a reset's acknowledgement counts as one.
FORGET_UNUSED = """
if redis.call('get', KEYS[1]) == '0' and redis.call('exists', KEYS[2]) == 0 then
  return redis.call('del', KEYS[1])
end
return 0
"""

ControlHandler = Callable[[str, str], Awaitable[None]]

# The kind of an entry that is reply text (the other kinds are the frame's type).
TEXT = "text"
# The kind of an entry with a reply's whole text so far, from its first character (in a stream
# written anew): a client that has part of it is sent the rest.
TEXT_SO_FAR = "text-so-far"


@dataclass(frozen=True, slots=True)
class Entry:
    """One frame in a conversation's stream: the only shape in which frames travel through
    Redis. Its id is `SEQ-0`; its fields are the frame's JSON (`f`), its kind (`k`) and the
    position of the turn it belongs to (`t`)."""

    seq: int
    frame: str  # the frame's JSON, as clients are sent it
    kind: str  # `TEXT`, `TEXT_SO_FAR`, or the frame's type
    turn: int

    @property
    def id(self) -> str:
        return f"{self.seq}-0"

    @property
    def ends_turn(self) -> bool:
        return self.kind == "end"

    def fields(self) -> dict[str, str]:
        return {"f": self.frame, "t": str(self.turn), "k": self.kind}

    @classmethod
    def decode(cls, raw: tuple[str, dict[str, str]]) -> Entry:
        """An entry as Redis gives it back (`XRANGE`, `XREAD`)."""
        entry_id, fields = raw
        return cls(int(entry_id.split("-", 1)[0]), fields["f"], fields["k"], int(fields["t"]))


# A batch whose place in the stream is not known: its followers read the stream instead.
UNKNOWN = -1


def encode_entries(before: int, entries: Sequence[Entry]) -> str:
    """Entries as one shard-channel message: the `seq` of the stream's entry just before them
    (or `UNKNOWN`), then a line each, `seq kind turn frame` (a frame's JSON holds no
    newline)."""
    lines = (f"{e.seq} {e.kind} {e.turn} {e.frame}" for e in entries)
    return "\n".join((str(before), *lines))


def decode_entries(message: str) -> tuple[int, list[Entry]]:
    """What `encode_entries` put in a message: `before`, and the entries."""
    before, *lines = message.split("\n")
    entries = []
    for line in lines:
        seq, kind, turn, frame = line.split(" ", 3)
        entries.append(Entry(int(seq), frame, kind, int(turn)))
    return int(before), entries


def tagged(tag: str, name: str) -> str:
    """A key whose hash tag is `tag` (a conversation's id, a worker's): on a Redis Cluster all
    the keys with one tag are in one slot."""
    return f"chat:{{{tag}}}:{name}"


def script_fields(entries: Sequence[Entry]) -> list[str]:
    """Entries as the scripts that add them take them: id, frame, kind, for each."""
    return [value for entry in entries for value in (entry.id, entry.frame, entry.kind)]


class Lease:
    """The right to run a conversation's turn, which one worker at a time holds.

    `acquire()` takes it if nobody holds it; from then on it is renewed (with every other
    lease of the worker, in one round trip) until it is given back, which leaving an
    `async with lease:` block does. `on_lost()` is called if another worker takes it
    meanwhile.
    """

    def __init__(self, cluster: Cluster, conversation_id: str, on_lost: Callable[[], None]) -> None:
        self.cluster = cluster
        self.conversation_id = conversation_id
        self.key = Cluster.lease_key(conversation_id)
        self.on_lost = on_lost
        # Once taken: the last `seq` stored, and the last in the stream (see `acquire`).
        self.seen: tuple[int, int] | None = None
        # Once taken: whether nothing has happened in the conversation since it was announced
        # (its `seq` is still the announced 0, its stream empty): the store cannot have it.
        self.untouched = False
        self.given_back = False

    def __repr__(self) -> str:
        held = self.cluster._held.get(self.conversation_id) is self
        return f"<Lease {self.conversation_id} {'held' if held else 'not held'}>"

    async def acquire(self) -> bool:
        """Take the lease if nobody holds it, and keep renewing it; False if somebody does.

        In the same round trip, what Redis knows of the conversation's `seq` is read into
        `seen`: the last one stored (the worker that held the lease last stored its turn,
        then said so) and the last in the stream."""
        cluster = self.cluster
        pipe = cluster.redis.pipeline(transaction=False)
        pipe.set(self.key, cluster.worker, nx=True, px=LEASE_MS)
        cluster.read_seqs(pipe, self.conversation_id)
        taken, stored, last = await pipe.execute()
        if not taken:
            return False
        self.seen = Cluster.seqs_read(stored, last)
        self.untouched = stored == "0" and not last
        cluster._held[self.conversation_id] = self
        return True

    def stop_renewing(self) -> None:
        """Renew it no more: it expires within `LEASE_MS` unless given back first."""
        if self.cluster._held.get(self.conversation_id) is self:
            del self.cluster._held[self.conversation_id]

    async def give_back(self) -> None:
        """Stop renewing the lease, then release it if this worker still holds it."""
        # In this order: a renewal on its way when the lease is released would take it again,
        # and is told apart (see `Cluster.renew`) by the lease no longer being renewed.
        if self.given_back:
            return
        self.stop_renewing()
        await self.cluster.release_lease(self.conversation_id)
        self.given_back = True

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.give_back()
        except SHARED_STATE_ERRORS as exc:
            # It expires within `LEASE_MS`: another worker waits that long at most.
            log.warning("cannot give a lease back (%s); it expires shortly", exc)


class Cluster:
    """This worker's connection to the others."""

    def __init__(self, url: str) -> None:
        self.worker = uuid.uuid4().hex[:12]
        self.url = url
        # Whether Redis is a Redis Cluster: keys are spread over its primaries by slot.
        self.sharded = is_cluster(url)
        self.redis: SharedRedis
        if self.sharded:
            self.redis = open_cluster(
                url, REDIS_CONNECTIONS, decode_responses=True, health_check_interval=5
            )
        else:
            # A burst of requests waits its turn for one of a bounded set of connections.
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=REDIS_CONNECTIONS,
                timeout=REDIS_WAIT_S,
                decode_responses=True,
                health_check_interval=5,
                **redis_options(),
            )
            self.redis = redis.Redis.from_pool(pool)
        self._handlers: list[ControlHandler] = []
        self._listener: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        # Leases this worker holds (and renews) while their turns run.
        self._held: dict[str, Lease] = {}
        self._renew_lease = self.redis.register_script(RENEW_LEASE)
        self._release_lease = self.redis.register_script(RELEASE_LEASE)
        self._restore_turn = self.redis.register_script(RESTORE_TURN)
        self._append_to_turn = self.redis.register_script(APPEND_TO_TURN)
        self._forget_unused = self.redis.register_script(FORGET_UNUSED)

    # Keys: each conversation's in one slot of a cluster (its id is their hash tag).

    @staticmethod
    def frames(conversation_id: str) -> str:
        return tagged(conversation_id, "frames")

    @staticmethod
    def lease_key(conversation_id: str) -> str:
        return tagged(conversation_id, "lease")

    @staticmethod
    def seq(conversation_id: str) -> str:
        return tagged(conversation_id, "seq")

    @staticmethod
    def owner(conversation_id: str) -> str:
        return tagged(conversation_id, "owner")

    @staticmethod
    def assistant(conversation_id: str) -> str:
        return tagged(conversation_id, "assistant")

    @staticmethod
    def watchers(conversation_id: str) -> str:
        return tagged(conversation_id, "watchers")

    @staticmethod
    def live(conversation_id: str) -> str:
        """The shard channel its new entries are sent on, on a cluster."""
        return tagged(conversation_id, "live")

    @staticmethod
    def turns_of(worker: str) -> str:
        """The conversations whose turn a worker runs and has not stored yet (a set)."""
        return tagged(worker, "turns")

    @staticmethod
    def conversation_of(key: str) -> str:
        """The conversation a key or channel of the above is about."""
        return key.partition("{")[2].partition("}")[0]

    # Life cycle.

    async def start(self) -> None:
        """Listen for control messages (and fail here if Redis cannot be reached)."""
        await cast(Awaitable[Any], self.redis.ping())
        self._listener = asyncio.create_task(self._listen(), name="cluster-control")
        self._renewer = asyncio.create_task(self._renew_all(), name="cluster-leases")

    async def close(self) -> None:
        for task in (self._listener, self._renewer):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        try:
            # Everything this worker ran is stored by now (it drained): nothing to recover.
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(WORKERS, self.worker)
            pipe.delete(self.turns_of(self.worker))
            await pipe.execute()
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot say this worker is leaving (%s)", exc)
        await self.redis.aclose()

    async def ping(self) -> None:
        """Return once Redis answers; raise if it cannot be reached."""
        await cast(Awaitable[Any], self.redis.ping())

    def on_control(self, handler: ControlHandler) -> None:
        """Call `handler(conversation_id, command)` for every control message."""
        self._handlers.append(handler)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.psubscribe(CONTROL_PATTERN)
                    async for message in pubsub.listen():
                        if message["type"] != "pmessage":
                            continue
                        conversation_id = str(message["channel"]).rsplit(":", 1)[1]
                        command, _, target = str(message["data"]).partition(" ")
                        if target not in ("*", self.worker):
                            continue
                        for handler in self._handlers:
                            await handler(conversation_id, command)
            except (RedisError, OSError) as exc:
                log.warning("control channel lost (%s); reconnecting", exc)
                await asyncio.sleep(0.5)

    async def control(self, conversation_id: str, command: str, worker: str = "*") -> None:
        """Tell `worker` (every worker, by default) `command` about a conversation."""
        await self.redis.publish(f"chat:control:{conversation_id}", f"{command} {worker}")

    async def stop_elsewhere(self, conversation_id: str) -> bool:
        """Ask the worker holding the conversation's lease to stop its reply; False if none."""
        holder = await self.holder(conversation_id)
        if holder is None:
            return False
        if holder != self.worker:  # if it is this one, it is already letting go
            await self.control(conversation_id, "stop", holder)
        return True

    # Leases.

    def lease(self, conversation_id: str, on_lost: Callable[[], None] = lambda: None) -> Lease:
        """The conversation's lease, not taken yet (see `Lease`)."""
        return Lease(self, conversation_id, on_lost)

    async def give_back_all(self) -> None:
        """Stop renewing every lease held here and release them, in one round trip (a worker
        that drains, once its replies are stored)."""
        held, self._held = list(self._held), {}
        if not held:
            return
        pipe = self.redis.pipeline(transaction=False)
        for conversation_id in held:
            await run_script(
                self._release_lease, [self.lease_key(conversation_id)], [self.worker], pipe
            )
        await pipe.execute()

    async def _renew_all(self) -> None:
        """Every `RENEW_EVERY` s, say this worker lives, and renew every lease held here, in
        one round trip."""
        while True:
            try:
                await cast(Awaitable[Any], self.redis.zadd(WORKERS, {self.worker: time.time()}))
                await self.renew()
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot renew leases (%s); trying again", exc)
            await asyncio.sleep(RENEW_EVERY)

    async def renew(self) -> None:
        """Renew every lease held here, in one round trip; `on_lost()` for those lost."""
        held = list(self._held.items())
        if not held:
            return
        pipe = self.redis.pipeline(transaction=False)
        for conversation_id, _ in held:
            keys = [self.lease_key(conversation_id), self.frames(conversation_id)]
            await run_script(self._renew_lease, keys, [self.worker, LEASE_MS], pipe)
        renewed = await pipe.execute()
        for (conversation_id, lease), outcome in zip(held, renewed, strict=True):
            # Only the lease that was renewed: while the round trip was out, it may have been
            # given back and taken again for the next turn, whose lease this outcome is not
            # about.
            current = self._held.get(conversation_id) is lease
            if outcome == RETAKEN and not current:
                # Taken again after it was given back: given back once more.
                await self.release_lease(conversation_id)
            elif outcome == RETAKEN:
                log.warning("a lease Redis had lost was taken again; the reply goes on")
            elif outcome != RENEWED and current:
                del self._held[conversation_id]
                lease.on_lost()

    async def restore(self, conversation_id: str, position: int, entries: Sequence[Entry]) -> bool:
        """Write the stream of turn `position` anew with `entries`, holding the lease; False,
        and nothing written, if another worker holds it."""
        keys = [self.lease_key(conversation_id), self.frames(conversation_id)]
        args: list[str | int] = [self.worker, LEASE_MS, position, STREAM_TTL_S]
        written = bool(await self._restore_turn(keys=keys, args=[*args, *script_fields(entries)]))
        if written:
            await self.told_followers(conversation_id, entries)
        return written

    async def append_to_turn(
        self, conversation_id: str, position: int, first: int, entries: Sequence[Entry]
    ) -> bool:
        """Add `entries` to the stream if it still holds turn `position`, begun at `seq`
        `first`, not ended; False, and nothing added, otherwise."""
        args: list[str | int] = [position, f"{first}-0", *script_fields(entries)]
        added = bool(await self._append_to_turn(keys=[self.frames(conversation_id)], args=args))
        if added:
            await self.told_followers(conversation_id, entries)
        return added

    async def release_lease(self, conversation_id: str) -> None:
        """Release the conversation's lease if this worker holds it."""
        await self._release_lease(keys=[self.lease_key(conversation_id)], args=[self.worker])

    async def holder(self, conversation_id: str) -> str | None:
        """The worker that holds the lease, if any."""
        return cast(
            str | None, await cast(Awaitable[Any], self.redis.get(self.lease_key(conversation_id)))
        )

    async def running(self, conversation_id: str) -> bool:
        """Whether a worker holds the conversation's lease, or its stream has a turn not ended
        (which a worker that sees its runner gone ends, from the stream)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.lease_key(conversation_id))
        pipe.xrevrange(self.frames(conversation_id), count=1)
        holder, last = await pipe.execute()
        return holder is not None or (bool(last) and not Entry.decode(last[0]).ends_turn)

    async def released(self, conversation_id: str, within: float) -> bool:
        """Wait until nobody holds the conversation's lease; False if still held after `within`."""
        deadline = time.monotonic() + within
        while await self.holder(conversation_id) is not None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # Turns in flight, by worker: what a worker that died leaves to be stored.

    def turn_begun(self, pipe: ScriptClient, conversation_id: str) -> None:
        """Note, in `pipe`, that this worker runs a turn of the conversation, not stored yet."""
        key = self.turns_of(self.worker)
        pipe.sadd(key, conversation_id)
        pipe.expire(key, STREAM_TTL_S)

    async def turn_stored(self, conversation_id: str, seq: int, lease: Lease) -> None:
        """The turn this worker ran is stored, the conversation's last `seq` being `seq`:
        said, and `lease` given back after it, in one round trip."""
        lease.stop_renewing()  # as `Lease.give_back` does
        pipe = self.redis.pipeline(transaction=False)
        # Only over the one `announce` made: a conversation deleted meanwhile (its keys gone)
        # is not made known again.
        pipe.set(self.seq(conversation_id), seq, ex=STREAM_TTL_S * 24, xx=True)
        pipe.srem(self.turns_of(self.worker), conversation_id)
        if self.sharded:
            await run_script(self._release_lease, [lease.key], [self.worker], pipe)
        else:  # by its hash, not asking first whether Redis has it (another round trip)
            pipe.evalsha(self._release_lease.sha, 1, lease.key, self.worker)
        try:
            await pipe.execute()
        except NoScriptError:  # Redis restarted meanwhile: the rest went through
            await self.release_lease(conversation_id)
        lease.given_back = True

    async def dead_workers(self, silent_for: float) -> list[str]:
        """Workers not heard from for `silent_for` seconds."""
        since = time.time() - silent_for
        found = await cast(
            Awaitable[Any], self.redis.zrangebyscore(WORKERS, "-inf", since, start=0, num=20)
        )
        return [str(worker) for worker in found]

    async def claim_turns_of(self, worker: str) -> list[str] | None:
        """The conversations a dead worker ran turns of, for this worker alone to recover
        (None if another worker claimed them first)."""
        if not await cast(Awaitable[Any], self.redis.zrem(WORKERS, worker)):
            return None
        return sorted(await cast(Awaitable[Any], self.redis.smembers(self.turns_of(worker))))

    async def recovered(self, worker: str) -> None:
        await cast(Awaitable[Any], self.redis.delete(self.turns_of(worker)))

    # Sequence numbers of conversations nobody runs.

    async def last_seq(self, conversation_id: str) -> int:
        """The last `seq` a conversation used, as far as Redis knows (0 if it does not)."""
        return max(await self.last_seqs(conversation_id))

    async def last_seqs(self, conversation_id: str) -> tuple[int, int]:
        """The last `seq` stored, as the worker that stored it said, and the last in the
        stream (0 for what Redis does not know)."""
        pipe = self.redis.pipeline(transaction=False)
        self.read_seqs(pipe, conversation_id)
        return self.seqs_read(*await pipe.execute())

    def read_seqs(self, pipe: ScriptClient, conversation_id: str) -> None:
        """Queue on `pipe` the reads `seqs_read` makes sense of."""
        pipe.get(self.seq(conversation_id))
        pipe.xrevrange(self.frames(conversation_id), count=1)

    @staticmethod
    def seqs_read(stored: str | None, last: list[Any]) -> tuple[int, int]:
        """The last `seq` stored and the last in the stream, from `read_seqs`' answers."""
        return int(stored or 0), Entry.decode(last[0]).seq if last else 0

    async def known(self, conversation_id: str) -> tuple[str, str | None] | None:
        """The owner of this conversation id, and its assistant, if any worker has handed it
        out or used it lately."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(self.seq(conversation_id), self.frames(conversation_id))
        pipe.get(self.owner(conversation_id))
        pipe.get(self.assistant(conversation_id))
        count, owner, assistant = await pipe.execute()
        # Whose it is must be known: keys a worker wrote after a deletion say nobody's.
        return (str(owner), assistant) if count and owner is not None else None

    async def announce(
        self, conversation_id: str, owner: str, assistant: str | None, watched: bool = False
    ) -> None:
        """Make a new conversation's id, whose it is and which assistant answers it, known to
        every worker (for an hour, if unused; as long as its stream once used); `watched`:
        with this worker watching it (see `watch`)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.seq(conversation_id), 0, nx=True, ex=STREAM_TTL_S)
        pipe.set(self.owner(conversation_id), owner, ex=STREAM_TTL_S * 24)
        if assistant is not None:
            pipe.set(self.assistant(conversation_id), assistant, ex=STREAM_TTL_S * 24)
        if watched:
            self._watched(pipe, conversation_id, time.time() + WATCH_TTL)
        await pipe.execute()

    async def forget_unused(self, conversation_id: str) -> None:
        """Drop the id of a conversation in which nothing was asked."""
        await self._forget_unused(keys=[self.seq(conversation_id), self.frames(conversation_id)])

    async def set_last_seq(self, conversation_id: str, seq: int) -> None:
        """Record the conversation's last `seq`, unless it was deleted (see `turn_stored`)."""
        key = self.seq(conversation_id)
        await cast(Awaitable[Any], self.redis.set(key, seq, ex=STREAM_TTL_S * 24, xx=True))

    # Frames.

    async def publish(self, conversation_id: str, entries: Sequence[Entry], fresh: bool) -> None:
        """Append `entries` to the conversation's stream; `fresh` starts the stream anew."""
        key = self.frames(conversation_id)
        pipe = self.redis.pipeline(transaction=fresh)
        if fresh:
            pipe.delete(key)
        for entry in entries:
            pipe.xadd(key, entry.fields(), id=entry.id)  # type: ignore[arg-type]
        pipe.expire(key, STREAM_TTL_S)
        self.tell_followers(pipe, conversation_id, entries)
        await pipe.execute()

    def tell_followers(
        self,
        pipe: ScriptClient,
        conversation_id: str,
        entries: Sequence[Entry],
        before: int = UNKNOWN,
    ) -> None:
        """On a cluster, send `entries`, just added to the stream, on the conversation's shard
        channel too, in the same pipeline (after them, in the same slot). `before` is the
        `seq` of the stream's entry just before them, if known."""
        if self.sharded and entries:
            pipe.spublish(self.live(conversation_id), encode_entries(before, entries))

    async def told_followers(self, conversation_id: str, entries: Sequence[Entry]) -> None:
        """`tell_followers` on its own, for entries a script added."""
        if self.sharded and entries:
            message = encode_entries(UNKNOWN, entries)
            await cast(Awaitable[Any], self.redis.spublish(self.live(conversation_id), message))

    async def turn_frames(self, conversation_id: str, after: int) -> tuple[int | None, list[Entry]]:
        """The position of the turn in the stream (None if there is none) and its frames after
        `after`, read together."""
        key = self.frames(conversation_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xrange(key, count=1)
        pipe.xrange(key, min=f"({after}-0")
        first, rest = await pipe.execute()
        if not first:
            return None, []
        return Entry.decode(first[0]).turn, [Entry.decode(raw) for raw in rest]

    async def latest_position(self, conversation_id: str) -> int | None:
        """The position of the turn in the stream (the latest any worker ran); None if none."""
        raws = await cast(Awaitable[Any], self.redis.xrange(self.frames(conversation_id), count=1))
        if not raws:
            return None
        first = Entry.decode(raws[0])
        return None if first.kind == "info" else first.turn  # a reset's acknowledgement

    async def whole_turn(self, conversation_id: str) -> list[Entry]:
        """Every frame in the stream."""
        raws = await cast(Awaitable[Any], self.redis.xrange(self.frames(conversation_id)))
        return [Entry.decode(raw) for raw in raws]

    async def forget(self, conversation_id: str) -> None:
        """Drop everything Redis holds about a deleted conversation, and tell every worker."""
        keys = [
            self.frames(conversation_id),
            self.seq(conversation_id),
            self.owner(conversation_id),
            self.assistant(conversation_id),
            self.watchers(conversation_id),
        ]
        await cast(Awaitable[Any], self.redis.delete(*keys))
        await self.control(conversation_id, "deleted")

    # Watchers.

    async def watch(self, conversation_ids: Sequence[str]) -> None:
        """Say this worker has clients of these conversations (for the next `WATCH_TTL` s)."""
        until = time.time() + WATCH_TTL
        pipe = self.redis.pipeline(transaction=False)
        for conversation_id in conversation_ids:
            self._watched(pipe, conversation_id, until)
        await pipe.execute()

    def _watched(self, pipe: Any, conversation_id: str, until: float) -> None:
        pipe.zadd(self.watchers(conversation_id), {self.worker: until})
        pipe.expire(self.watchers(conversation_id), int(WATCH_TTL) * 2)

    async def unwatch(self, conversation_id: str) -> None:
        await cast(Awaitable[Any], self.redis.zrem(self.watchers(conversation_id), self.worker))

    async def watched_elsewhere(self, conversation_id: str) -> bool:
        """Whether another worker has clients of the conversation."""
        members = await cast(
            Awaitable[Any],
            self.redis.zrangebyscore(self.watchers(conversation_id), time.time(), "+inf"),
        )
        return any(member != self.worker for member in members)
