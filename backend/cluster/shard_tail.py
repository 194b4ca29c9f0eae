"""On a Redis Cluster, one listener per node for the frames of every conversation this
worker's clients follow.

A blocking read over many streams cannot span the cluster's slots, so there each new batch of
a conversation's entries is also sent on its shard channel (`SPUBLISH`, see
`Cluster.tell_followers`), and a worker listens, on one connection per node, to the channels
of the conversations it follows. Pub/sub keeps nothing for a listener that was away: every
time a channel is (re)subscribed, the stream is read from the last entry delivered on, so a
reconnection, a failover or a slot that moved costs a catch-up, never an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster

from backend.cluster.shared import UNKNOWN, Cluster, Entry, decode_entries
from backend.config.redis_clients import cluster_address, redis_options
from backend.protocol.errors import SHARED_STATE_ERRORS

log = logging.getLogger(__name__)

Handler = Callable[[list[Entry]], None]

# How often each followed channel's node is checked against the cluster's slot map (which
# the client refreshes as soon as a command is redirected), and a lost listener is retried.
CHECK_EVERY = 1.0
RETRY_AFTER = 0.5
# Longest a node may take to confirm a subscription before its connection is taken for lost.
CONFIRM_WITHIN = 5.0


class NodeListener:
    """One node's connection, subscribed to the channels of the followed conversations whose
    slots it serves."""

    def __init__(self, tail: ShardTail, node: ClusterNode) -> None:
        self.tail = tail
        self.name = node.name
        address = cluster_address(tail.cluster.url)
        self.client = Redis(
            host=node.host,
            port=int(node.port),
            username=address.username,
            password=address.password,
            ssl=address.tls,
            decode_responses=True,
            **redis_options(),
        )
        self.pubsub: PubSub = self.client.pubsub()
        self.conversations: set[str] = set()
        self._subscribed = asyncio.Event()
        # One command at a time on the connection (the first one opens it).
        self._sending = asyncio.Lock()
        # Channels subscribed to whose confirmation has not come yet.
        self._confirming: dict[str, asyncio.Event] = {}
        self.task = asyncio.create_task(self._listen(), name=f"shard-tail-{self.name}")

    async def subscribe(self, conversation_id: str) -> None:
        """Listen to the conversation's channel; return once the node says it does, so that
        anything sent on it from then on arrives."""
        channel = Cluster.live(conversation_id)
        self.conversations.add(conversation_id)
        confirmed = self._confirming.setdefault(channel, asyncio.Event())
        async with self._sending:
            await self.pubsub.ssubscribe(channel)
        self._subscribed.set()
        try:
            await asyncio.wait_for(confirmed.wait(), CONFIRM_WITHIN)
        except TimeoutError as exc:
            raise ConnectionError(f"Redis node {self.name} did not confirm a subscription") from exc
        finally:
            self._confirming.pop(channel, None)

    async def unsubscribe(self, conversation_id: str) -> None:
        self.conversations.discard(conversation_id)
        async with self._sending:
            await self.pubsub.sunsubscribe(Cluster.live(conversation_id))

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.wait([self.task])
        with contextlib.suppress(*SHARED_STATE_ERRORS):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()

    async def _listen(self) -> None:
        try:
            while True:
                if not self.pubsub.subscribed:
                    self._subscribed.clear()
                    await self._subscribed.wait()
                message = await self.pubsub.get_message(timeout=CHECK_EVERY)
                if message is None:
                    continue
                kind = message["type"]
                channel = str(message["channel"])
                conversation_id = Cluster.conversation_of(channel)
                if kind == "smessage":
                    self.tail.heard(conversation_id, *decode_entries(str(message["data"])))
                elif kind == "ssubscribe":
                    confirmed = self._confirming.get(channel)
                    if confirmed is not None:
                        confirmed.set()
                elif kind == "sunsubscribe" and conversation_id in self.conversations:
                    # The node gave the slot up (a failover, a slot moved): follow it there.
                    self.conversations.discard(conversation_id)
                    self.tail.moved(conversation_id)
        except SHARED_STATE_ERRORS as exc:
            log.warning("lost the frames' listener on Redis node %s (%s)", self.name, exc)
            self.tail.lost(self)


class ShardTail:
    """Follows conversations' streams from a `seq` on, calling a handler with new entries
    (the same interface as `backend.cluster.tail.Tail`, for a Redis Cluster)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = cast(RedisCluster, cluster.redis)
        self._positions: dict[str, int] = {}
        self._handlers: dict[str, Handler] = {}
        self._listeners: dict[str, NodeListener] = {}
        self._where: dict[str, NodeListener] = {}  # conversation -> the listener it is on
        self._work: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._checker = asyncio.create_task(self._check(), name="shard-tail-check")

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.wait([self._checker])
        for task in list(self._work):
            task.cancel()
        for listener in list(self._listeners.values()):
            await listener.close()

    def follow(self, conversation_id: str, after: int, handler: Handler) -> None:
        """Call `handler` with the conversation's entries after `after`, as they come."""
        self._positions[conversation_id] = after
        self._handlers[conversation_id] = handler
        self._spawn(self._subscribe(conversation_id))

    def unfollow(self, conversation_id: str) -> None:
        self._positions.pop(conversation_id, None)
        self._handlers.pop(conversation_id, None)
        listener = self._where.pop(conversation_id, None)
        if listener is not None:
            self._spawn(self._unsubscribe(listener, conversation_id))

    def advance(self, conversation_id: str, seq: int) -> None:
        """Entries up to `seq` are known already: deliver from there on."""
        if self._positions.get(conversation_id, seq) < seq:
            self._positions[conversation_id] = seq

    # From the listeners.

    def heard(self, conversation_id: str, before: int, entries: list[Entry]) -> None:
        """A batch that came on a channel. If it follows on from what was delivered, it is
        delivered; if something may be missing before it (a message lost with a connection,
        a failover), the stream, which has it all, is read from the position instead."""
        position = self._positions.get(conversation_id)
        if position is None:
            return
        if before == UNKNOWN or before > position:
            self._spawn(self._catch_up(conversation_id))
            return
        self.deliver(conversation_id, entries)

    def deliver(self, conversation_id: str, entries: list[Entry]) -> None:
        """Entries in stream order: those past the position, to the handler."""
        handler = self._handlers.get(conversation_id)
        position = self._positions.get(conversation_id)
        if handler is None or position is None:
            return
        fresh = [entry for entry in entries if entry.seq > position]
        if not fresh:
            return
        self._positions[conversation_id] = fresh[-1].seq
        try:
            handler(fresh)
        except Exception:
            log.exception("delivering a conversation's frames failed")

    def moved(self, conversation_id: str) -> None:
        """The conversation's channel is no longer served where it was subscribed."""
        self._where.pop(conversation_id, None)
        if conversation_id in self._handlers:
            # Once the slot map is asked again: the client may not know the new owner yet.
            self._spawn(self._subscribe(conversation_id, retrying=True))

    def lost(self, listener: NodeListener) -> None:
        """A node's connection failed: its conversations are followed anew, wherever their
        slots are served now."""
        if self._listeners.get(listener.name) is listener:
            del self._listeners[listener.name]
        self._spawn(listener.close())
        for conversation_id in list(listener.conversations):
            if self._where.get(conversation_id) is listener:
                del self._where[conversation_id]
                self._spawn(self._subscribe(conversation_id, retrying=True))

    # Subscriptions.

    async def _subscribe(self, conversation_id: str, retrying: bool = False) -> None:
        """Listen to the conversation's channel on the node serving it, then read what the
        stream got meanwhile; again, until it works, while the conversation is followed."""
        while conversation_id in self._handlers and conversation_id not in self._where:
            if retrying:
                await asyncio.sleep(RETRY_AFTER)
                # Ask the cluster where slots are now (a failover may be under way).
                with contextlib.suppress(*SHARED_STATE_ERRORS):
                    await self.redis.nodes_manager.initialize()
            retrying = True
            try:
                node = self._node_of(conversation_id)
                listener = self._listeners.get(node.name)
                if listener is None:
                    listener = self._listeners[node.name] = NodeListener(self, node)
                self._where[conversation_id] = listener
                await listener.subscribe(conversation_id)
                await self._catch_up(conversation_id)
            except SHARED_STATE_ERRORS as exc:
                log.warning("cannot follow a conversation's frames yet (%s)", exc)
                self._where.pop(conversation_id, None)

    async def _catch_up(self, conversation_id: str) -> None:
        """Deliver what the stream has past the position."""
        position = self._positions.get(conversation_id)
        if position is None:
            return
        try:
            raws = await cast(
                Any, self.redis.xrange(Cluster.frames(conversation_id), min=f"({position}-0")
            )
        except SHARED_STATE_ERRORS as exc:
            # Read again with the next batch heard, or when the subscription is made anew.
            log.warning("cannot read a conversation's stream (%s)", exc)
            return
        if raws:
            self.deliver(conversation_id, [Entry.decode(raw) for raw in raws])

    async def _unsubscribe(self, listener: NodeListener, conversation_id: str) -> None:
        try:
            await listener.unsubscribe(conversation_id)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot stop listening to a conversation's frames (%s)", exc)

    async def _check(self) -> None:
        """Move each channel whose slot another node serves now (the client learns of a
        failover as soon as one of its commands is redirected)."""
        while True:
            await asyncio.sleep(CHECK_EVERY)
            for conversation_id, listener in list(self._where.items()):
                try:
                    node = self._node_of(conversation_id)
                except SHARED_STATE_ERRORS:
                    continue
                if node.name != listener.name:
                    del self._where[conversation_id]
                    self._spawn(self._unsubscribe(listener, conversation_id))
                    self._spawn(self._subscribe(conversation_id))

    def _node_of(self, conversation_id: str) -> ClusterNode:
        """The primary serving the conversation's slot, as the client knows it."""
        node = self.redis.get_node_from_key(Cluster.live(conversation_id))
        if node is None:
            raise ConnectionError("no node of the Redis Cluster serves the conversation's slot")
        return node

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
