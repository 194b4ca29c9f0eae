"""Every conversation of an app: new ones, joining stored ones, deleting, and draining at exit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from starlette import status

from backend.chat.conversation import Conversation, Services, report_failure
from backend.chat.relay import Relays
from backend.config.settings import Settings
from backend.config.timings import CLOSE_WAIT, LINGER
from backend.model.assistants import UnknownAssistant
from backend.model.reply import Replier
from backend.store.records import (
    ConversationRecord,
    ConversationSummary,
    DeliveryRecord,
    title_for,
)
from backend.store.sql import Store
from backend.store.write_behind import WriteBehind
from backend.users.quotas import Quotas
from backend.webhooks.events import Webhooks

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
RESTARTING = "The server is restarting; reconnect to resume the conversation."
DELETED = "This conversation was deleted."


class UnknownConversation(Exception):
    """A conversation id that is malformed, was never stored, or was deleted."""


class PastTheEnd(ValueError):
    """A client resuming after a `seq` the conversation has not reached: it would wait for
    frames numbered above it and miss every one before."""


def unknown(conversation_id: str) -> UnknownConversation:
    """The refusal for a conversation that does not exist, and alike for another user's, so
    ids cannot be probed."""
    return UnknownConversation(f"No conversation {conversation_id!r}; it may be deleted.")


class Conversations:
    """Keeps in memory the conversations someone uses, and only those.

    A conversation is loaded when a client joins it or a request acts on it. It leaves memory
    once it has no client, no reply in flight and nothing left to store, and then, if it was
    stored, `LINGER` seconds more.
    """

    def __init__(
        self,
        replier: Replier,
        settings: Settings,
        store: Store,
        relays: Relays,
        webhooks: Webhooks | None = None,
    ) -> None:
        self.store = store
        self.writer = WriteBehind(store)
        # Shared with the app's routes, which count connections and one-off replies.
        self.quotas = Quotas(settings, relays.redis, replier.metrics)
        self.webhooks = webhooks if webhooks is not None else Webhooks(settings.chat_webhooks)
        self.services = Services(
            replier,
            settings,
            self.writer,
            self.quotas,
            relays.relay,
            self._on_idle,
            self.webhooks,
        )
        self.relays = relays
        self.assistants = replier.assistants
        self.draining = False
        self._live: dict[str, Conversation] = {}
        self._loading: dict[str, asyncio.Task[ConversationRecord | None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._evicting: set[str] = set()  # conversations with an `_evict` under way
        self._writer_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store (and the link to the other workers) and start writing."""
        # Scaled out, a turn the store has as streaming may be another worker's, running; one
        # whose worker died is ended from its stream (see `RedisRelays`), not closed here.
        await self.store.start(self.relays.running if self.relays.shared else None)
        await self.relays.start(self)
        await self.quotas.start()
        self._writer_task = asyncio.create_task(self.writer.run(), name="store-writer")

    async def close(self) -> None:
        """Store what is pending and close the store."""
        if self._writer_task is not None:
            self._writer_task.cancel()
            await asyncio.wait([self._writer_task])
        for task in list(self._background):
            task.cancel()
        await self.quotas.close()
        try:
            await self.writer.flush()
        finally:
            await self.store.close()
            await self.relays.close()

    def new(self, owner: str, assistant: str | None = None) -> Conversation:
        """A fresh conversation of `owner`'s, answered by `assistant` (the default if None;
        `UnknownAssistant` for one the server does not offer); it is stored from its first
        question on."""
        self.assistants.check(assistant)
        return self._begin(uuid.uuid4().hex, owner, assistant)

    async def open_or_begin(
        self, conversation_id: str, owner: str, assistant: str | None = None
    ) -> Conversation:
        """`owner`'s conversation with this id, or a new one by it if there is none.

        Only for ids that no other user can arrive at (derived from `owner`'s own), so that
        an id nobody has is `owner`'s to take.
        """
        self.assistants.check(assistant)
        try:
            return await self.open(conversation_id, owner, assistant=assistant)
        except UnknownConversation:
            conversation = self._live.get(conversation_id)  # begun meanwhile by a request
            if conversation is None:
                return self._begin(conversation_id, owner, assistant)
            if conversation.owner != owner:
                raise
            return conversation

    def _begin(self, conversation_id: str, owner: str, assistant: str | None) -> Conversation:
        chosen = self.assistants.answering(assistant)
        conversation = Conversation(conversation_id, self.services, None, owner, chosen)
        self._live[conversation.id] = conversation
        conversation.begun()
        return conversation

    # What the relays see of the conversations (see `backend.chat.relay.Directory`).

    def live(self, conversation_id: str) -> Conversation | None:
        """The conversation if it is in memory."""
        return self._live.get(conversation_id)

    def watched(self) -> list[str]:
        """The ids of the conversations with clients here."""
        return [conversation.id for conversation in self._live.values() if conversation.clients]

    def deleted_elsewhere(self, conversation_id: str) -> None:
        """Another worker deleted the conversation: its clients here are told, its reply here
        stopped."""
        conversation = self._live.pop(conversation_id, None)
        if conversation is None:
            return
        conversation.deleted = True
        conversation.background(conversation.stop_here())
        conversation.close_all(status.WS_1008_POLICY_VIOLATION, DELETED)

    async def open(
        self, conversation_id: str, owner: str, after: int = 0, assistant: str | None = None
    ) -> Conversation:
        """`owner`'s conversation with this id, loaded if need be; raises `UnknownConversation`
        for one that does not exist and, alike, for one of another user's, `PastTheEnd` for a
        client resuming `after` a `seq` the conversation has not reached, and
        `UnknownAssistant` for a request naming an `assistant` that does not answer it."""
        if not ID_PATTERN.fullmatch(conversation_id):
            raise UnknownConversation(f"Malformed conversation id {conversation_id[:64]!r}.")
        conversation = self._live.get(conversation_id)
        if self.relays.shared:
            conversation = await self._open_shared(conversation_id, owner)
        elif conversation is None:
            conversation = await self._load(conversation_id, owner)
        if conversation.owner != owner:
            raise unknown(conversation_id)
        try:
            self.assistants.check(assistant, self.assistants.answering(conversation.assistant))
        except UnknownAssistant:
            conversation.drop_if_idle()
            raise
        if after:
            last = await conversation.last_seq()
            if after > last:
                conversation.drop_if_idle()
                raise PastTheEnd(
                    f"'after' {after} is past this conversation's last seq, {last}; "
                    f"rejoin with 'after' at most {last}."
                )
        return conversation

    async def _open_shared(self, conversation_id: str, owner: str) -> Conversation:
        """`open` scaled out: the conversation once Redis and the store have both answered, or
        what keeps either from answering (a client joining gets its history from both, and
        is told to come back later rather than left waiting for them)."""
        live = self._live.get(conversation_id)
        # A conversation loaded now has just been read from the store; one in memory is not.
        reading = self.store.ping() if live is not None else self._load(conversation_id, owner)
        read, reached = await asyncio.gather(reading, self.relays.ping(), return_exceptions=True)
        if isinstance(read, BaseException):
            raise read
        conversation = read if isinstance(read, Conversation) else live
        if conversation is None:  # deleted while the store was asked
            raise unknown(conversation_id)
        if isinstance(reached, BaseException):
            conversation.drop_if_idle()  # kept in memory for nobody otherwise
            raise reached
        return conversation

    async def _load(self, conversation_id: str, owner: str) -> Conversation:
        """The conversation, loaded into memory; another user's is refused before it is kept."""
        # Two clients joining at once share one load, and so one conversation.
        loading = self._loading.get(conversation_id)
        if loading is None:
            loading = asyncio.create_task(self.store.load(conversation_id))
            self._loading[conversation_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(conversation_id, None))
        record = await asyncio.shield(loading)
        conversation = self._live.get(conversation_id)
        if conversation is not None:
            return conversation
        assistant = None
        if record is not None:
            found: str | None = record.owner
        else:
            begun = await self.relays.begun_elsewhere(conversation_id)
            found, assistant = begun if begun is not None else (None, None)
        if found != owner:  # None: nobody's
            raise unknown(conversation_id)
        conversation = Conversation(conversation_id, self.services, record, owner, assistant)
        self._live[conversation_id] = conversation
        return conversation

    async def recover(self, conversation_id: str) -> None:
        """A worker that died ran a turn of the conversation: end and store it from its
        stream, if it was not stored (see `RedisRelay.recover`)."""
        conversation = self._live.get(conversation_id)
        if conversation is None:
            record = await self.store.load(conversation_id)
            begun = await self.relays.begun_elsewhere(conversation_id)
            if record is None and begun is None:
                return  # deleted, or never known to any worker
            owner = record.owner if record is not None else begun[0] if begun else ""
            try:
                conversation = await self._load(conversation_id, owner)
            except UnknownConversation:
                return
        try:
            await conversation.relay.recover()
        finally:
            conversation.drop_if_idle()

    async def read(self, conversation_id: str, owner: str) -> ConversationRecord | None:
        """`owner`'s conversation as it is now, its reply in flight included, wherever that
        runs; None if nothing was ever asked in it, or it is another user's."""
        record = await self._read(conversation_id)
        return record if record is not None and record.owner == owner else None

    async def _read(self, conversation_id: str) -> ConversationRecord | None:
        await self.writer.flush()
        record = await self.store.load(conversation_id)
        # The turn a worker is streaming (or just ended) reaches the store a moment later.
        latest = await self.relays.latest_turn(conversation_id)
        if latest is None:
            return record
        if record is None:
            begun = await self.relays.begun_elsewhere(conversation_id)
            if begun is None:
                return None
            owner, assistant = begun
            at = latest.asked_at
            record = ConversationRecord(
                conversation_id,
                title_for(latest.question),
                at,
                at,
                latest.last_seq,
                0,
                [],
                owner,
                assistant,
            )
        turns = [turn for turn in record.turns if turn.position != latest.position]
        record.turns = sorted([*turns, latest], key=lambda turn: turn.position)
        record.turn_count = max(record.turn_count, latest.position + 1)
        return record

    async def rename(
        self, conversation_id: str, owner: str, title: str
    ) -> ConversationSummary | None:
        """Give `owner`'s conversation a title of theirs (one its questions never replace);
        None if there is no such conversation."""
        # Written first if it is only in memory yet, so there is a row to rename.
        await self.writer.flush()
        renamed = await self.store.rename(conversation_id, owner, title)
        conversation = self._live.get(conversation_id)
        if renamed is not None and conversation is not None:
            conversation.title = renamed.title
        return renamed

    async def delete(self, conversation_id: str, owner: str) -> bool:
        """Stop, disconnect and remove `owner`'s conversation; False if there was none."""
        conversation = self._live.get(conversation_id)
        if conversation is not None and (not conversation.stored or conversation.owner != owner):
            return False  # an id nothing was asked in is not a conversation yet
        found = conversation is not None
        told: list[DeliveryRecord] = []
        if conversation is None:
            # Not in memory here: stored, or begun on another worker and not stored yet.
            record = await self.read(conversation_id, owner)
            if record is None:
                return False
            found, turns = True, record.turns
        else:
            del self._live[conversation_id]
            conversation.deleted = True
            await conversation.stop()
            conversation.close_all(status.WS_1008_POLICY_VIOLATION, DELETED)
            # The stopped reply's own events, if any, go with the deletion's.
            told, turns = conversation.take_deliveries(), conversation.turns
        told += self.webhooks.for_deletion(conversation_id, owner, (t.webhook for t in turns))
        await self.relays.forget(conversation_id)
        removed = await self.writer.delete(conversation_id, told)
        return removed or found

    async def drain(self, grace: float) -> None:
        """Let replies in flight finish for up to `grace` seconds, stop the rest, store
        everything, then close every client with 1012 so it reconnects and resumes."""
        self.draining = True
        replies = [c.reply for c in self._live.values() if c.reply is not None and c.replying]
        if replies:
            log.info("waiting up to %.1f s for %d replies to finish", grace, len(replies))
            await asyncio.wait(replies, timeout=grace)
        stopped = 0
        for conversation in list(self._live.values()):
            stopped += await conversation.stop_here()
        if stopped:
            log.warning("%d replies did not finish in time; stored as interrupted", stopped)
        await self.writer.flush()
        # Everything is stored: no turn held here is for anything any more (each reply gave
        # its own back as it ended; this catches one whose giving back failed). A client that
        # rejoins elsewhere must not wait for it to expire.
        await self.relays.give_back_all()
        closed = [
            client
            for conversation in list(self._live.values())
            for client in conversation.close_all(status.WS_1012_SERVICE_RESTART, RESTARTING)
        ]
        # Let the writers send the close, with its reason, before uvicorn closes what is left.
        if closed:
            waits = [asyncio.create_task(client.stopped.wait()) for client in closed]
            _, pending = await asyncio.wait(waits, timeout=CLOSE_WAIT)
            for task in pending:
                task.cancel()

    def _on_idle(self, conversation: Conversation) -> None:
        conversation.idle_since = time.monotonic()
        if conversation.id not in self._evicting:
            self._evicting.add(conversation.id)
            self._spawn(self._evict(conversation))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(report_failure)

    async def _evict(self, conversation: Conversation) -> None:
        try:
            # Kept in memory until what it said is stored (at the writer's next tick), and a
            # stored one for `LINGER` seconds more: the next question of a client that asks
            # over HTTP (each a request of its own) finds it without reading the store.
            await self.writer.stored(conversation.id)
            while conversation.stored and conversation.idle:
                left = conversation.idle_since + LINGER - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(left)
        finally:
            self._evicting.discard(conversation.id)
        if conversation.idle and self._live.get(conversation.id) is conversation:
            del self._live[conversation.id]
