"""One conversation while anyone uses it: its turns, its clients and its one reply in flight.

Every client joined to a conversation (sockets, SSE streams) gets the same frames with the same
`seq`. A question, stop, regenerate or reset from any of them acts on the conversation, which
runs at most one reply at a time. A reply outlives its clients by the resume grace, so a
client that reconnects finds it still going.

How frames reach the clients, and whose turn it is to run the reply, is the business of the
conversation's relay (`backend/chat/relay.py`): in this process, or shared by workers through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any

from langchain_core.messages import messages_from_dict

from backend.chat.gate import Gate
from backend.chat.outbox import Outbox
from backend.chat.relay import RelayFactory
from backend.config.settings import Settings
from backend.config.timings import RECANCEL_AFTER
from backend.model.history import History
from backend.model.reply import Replier
from backend.model.turn import Turn
from backend.observe import logs
from backend.protocol.errors import SHARED_STATE_ERRORS, ChatError
from backend.store.records import (
    ConversationRecord,
    DeliveryRecord,
    Found,
    TurnRecord,
    now,
    title_for,
)
from backend.store.write_behind import WriteBehind
from backend.users.quotas import Held, Quotas
from backend.webhooks.events import Webhooks
from schemas import ChatResponse

log = logging.getLogger(__name__)

# Given the turns as they stand, the position of the question a client means to edit.
Which = Callable[[list[TurnRecord]], int]
ONLY_THE_LAST = "Only the last question can be edited; ask this one again as a new question."


def report_failure(task: asyncio.Task[Any]) -> None:
    """Log what a background task that nobody awaits failed with, once (a shared state out of
    reach as a warning), rather than leave it to "Task exception was never retrieved"."""
    failure = None if task.cancelled() else task.exception()
    if failure is None:
        return
    if isinstance(failure, (ChatError, *SHARED_STATE_ERRORS)):
        log.warning("background work of a conversation failed: %s", failure)
    else:
        log.error("background work of a conversation failed", exc_info=failure)


def chain_context(writer: WriteBehind, owner: str, thread_id: str | None) -> dict[str, Any]:
    """What a user's chain is told of the conversation it answers in (its config's
    `configurable`): its id (None for a one-off reply), its owner, and a search over the
    owner's finished turns, for the chain's tools."""

    async def search_conversations(text: str, limit: int = 5) -> list[Found]:
        await writer.flush()
        return await writer.store.search(owner, text, limit)

    return {"thread_id": thread_id, "user": owner, "search_conversations": search_conversations}


@dataclass(frozen=True)
class Services:
    """What every conversation of an app shares."""

    replier: Replier
    settings: Settings
    writer: WriteBehind
    quotas: Quotas
    # Makes each conversation's relay (see `backend/chat/relay.py`): the app chooses which, once.
    relay: RelayFactory
    # Called when a conversation has no clients and no reply: it may leave memory.
    on_idle: Callable[[Conversation], None]
    # The webhook endpoints, and the events a reply's end makes for them.
    webhooks: Webhooks


class LiveTurn:
    """The `FrameSink` of a reply: numbers its frames, records them and sends them to all."""

    def __init__(self, conversation: Conversation, record: TurnRecord, regenerate: bool) -> None:
        self.conversation = conversation
        self.record = record
        self.regenerate = regenerate

    def send(self, frame: ChatResponse) -> None:
        if frame.type == "start" and self.regenerate:
            frame.regenerate = True
        if frame.type == "end":
            stopped_by = self.conversation.stopped_by
            if stopped_by is not None and frame.status == "interrupted":
                # Stopped by a failure, not by anyone: the client is told which, and why.
                self.conversation.stopped_by = None
                self.send(stopped_by.frame())
                frame.status = "error"
            self.record.status = frame.status
        self.record.events.append(frame)
        self.conversation.emit(frame)
        if frame.type == "end":
            self.conversation.ended(self.record)

    def token(self, text: str) -> None:
        conversation = self.conversation
        if self.record.text_base is None:
            self.record.text_base = conversation.seq
        conversation.seq += len(text)
        conversation.relay.token(text, conversation.seq)


class Conversation:
    """A conversation in memory; the store has everything it said once it is written."""

    def __init__(
        self,
        conversation_id: str,
        services: Services,
        record: ConversationRecord | None = None,
        owner: str = "",
        assistant: str | None = None,
    ) -> None:
        self.id = conversation_id
        self.services = services
        # The user it belongs to: nobody else may see it, join it or act on it.
        self.owner = record.owner if record else owner
        # The assistant that answers it (None: the server's default, for one stored before
        # conversations named theirs).
        self.assistant = record.assistant if record else assistant
        self.turns: list[TurnRecord] = record.turns if record else []
        self.seq = record.last_seq if record else 0
        self.title = record.title if record else None
        self.created_at = record.created_at if record else now()
        self.updated_at = record.updated_at if record else self.created_at
        self.clients: set[Outbox] = set()
        self.deleted = False
        # Why the reply in flight is being stopped, when no one asked for it: said as it ends.
        self.stopped_by: ChatError | None = None
        self.reply: asyncio.Task[None] | None = None
        # Held while a turn is taken, started, stopped or ended from elsewhere.
        self.turn_lock = asyncio.Lock()
        self.relay = services.relay(self)
        self._streaming: TurnRecord | None = None
        self._saved_length = (-1, -1)
        self._changed: set[int] = set()
        # A finished reply giving its turn back (see `Relay.release`).
        self._releasing: asyncio.Task[None] | None = None
        # Set when a client joins or leaves, for the resume grace to look again.
        self._clients_changed = Gate()
        self.idle_since = 0.0  # `time.monotonic()` when it last had no client and no reply
        self._background: set[asyncio.Task[Any]] = set()
        # Webhook events of replies that ended, to be stored with the next snapshot.
        self._deliveries: list[DeliveryRecord] = []
        # Whether the store has its row (then a turn kept elsewhere as it streams is stored
        # only once it ends).
        self._ever_stored = record is not None

    @property
    def stored(self) -> bool:
        """Whether anything was ever asked here (an unused id is never stored)."""
        return self.title is not None

    @property
    def idle(self) -> bool:
        """No clients and no reply: nothing keeps it in memory."""
        return not self.clients and not self.replying

    @property
    def replying(self) -> bool:
        """Whether a reply runs here, or has ended but not given its turn back yet."""
        return (self.reply is not None and not self.reply.done()) or self._releasing is not None

    # Frames.

    def emit(self, frame: ChatResponse) -> None:
        """Number `frame` as the conversation's next and send it to every client."""
        self.seq += 1
        frame.seq = self.seq
        self.relay.send(frame)

    def frames_after(self, after: int) -> Iterator[ChatResponse]:
        """Every frame of the turns in memory with `seq` above `after`: the history, then the
        reply so far."""
        for turn in self.turns:
            if turn.last_seq > after:
                yield from turn.frames_after(after)

    # Clients.

    def begun(self) -> None:
        """This new conversation's id is being handed out."""
        self.relay.announce()

    async def join(self, client: Outbox, after: int) -> None:
        """Send `client` what it missed after `after`, then every frame as it happens."""
        self.clients.add(client)
        self._clients_changed.set()
        await self.relay.join(client, after)

    def leave(self, client: Outbox) -> None:
        """`client` is gone; a reply nobody watches is stopped after the resume grace."""
        if client not in self.clients:
            return
        self.clients.discard(client)
        last = not self.clients
        self.relay.leave(client, last)
        if last:
            self._clients_changed.set()
            if not self.replying:
                self.services.on_idle(self)

    async def last_seq(self) -> int:
        """The last `seq` any client of the conversation can have been sent, wherever."""
        return max(self.seq, await self.relay.last_seq())

    async def turns_known(self) -> int:
        """How many turns it has, wherever they ran (those run elsewhere may not be in memory
        here yet)."""
        return max(len(self.turns), await self.relay.turns_elsewhere())

    def drop_if_idle(self) -> None:
        """A request that held the conversation without joining it is done with it."""
        if self.idle:
            self.services.on_idle(self)

    async def reply_in_flight(self) -> int | None:
        """The `seq` just before the first frame of the reply in flight (its question said
        back), wherever it runs; None when there is none."""
        # A reply whose `end` is out is not in flight, though its task may still be closing.
        if self.reply is not None and not self.reply.done():
            if self.turns and self.turns[-1].status is None:
                return self.turns[-1].echo_seq - 1
            return None
        return await self.relay.reply_elsewhere()

    def close_all(self, code: int, reason: str) -> list[Outbox]:
        """End every client's connection with `code`; the clients that were closed."""
        self.relay.close_all()
        clients, self.clients = self.clients, set()
        for client in clients:
            client.close(code, reason)
        return list(clients)

    def background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` on its own; a failure is logged."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(report_failure)

    async def _mind_the_grace(self) -> None:
        """While a reply runs: stop it once no client, here or elsewhere, has watched it for
        the resume grace."""
        grace = self.services.settings.chat_resume_grace
        unwatched_since: float | None = None
        while True:
            changed = self._clients_changed = Gate()
            wait: float | None = None
            if self.clients:
                unwatched_since = None
            elif await self.relay.watched_elsewhere():
                unwatched_since = None
                wait = self.relay.recheck_every
            else:
                if unwatched_since is None:
                    unwatched_since = time.monotonic()
                left = unwatched_since + grace - time.monotonic()
                if left <= 0:
                    self.background(self._stop_unwatched())
                    return
                recheck = self.relay.recheck_every
                wait = left if recheck is None else min(left, recheck)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)

    async def _stop_unwatched(self) -> None:
        if await self.stop():
            log.info("no client came back within the resume grace; reply stopped")

    # Acting on the conversation.

    async def ask(
        self, question: str, who: str, webhook: str | None = None, background: bool = False
    ) -> None:
        """Answer `question` from `who` (a user, or a client address), pre-empting the reply
        in flight; `RateLimited` if `who`'s quotas refuse it. `webhook` names the endpoint to
        call when the reply ends; a `background` reply runs on with no client watching."""
        await self._take_turn(question, who, webhook, background)

    async def regenerate(
        self,
        who: str,
        webhook: str | None = None,
        background: bool = False,
        edited: str | None = None,
        which: Which | None = None,
    ) -> bool:
        """Answer the last question again in place of its reply (its text replaced by
        `edited`, if given); False if nothing was asked. `which` tells, from the turns as
        they stand once the turn is held, the position of the question the client means to
        edit: an earlier one than the last is refused (`ChatError`, `bad_request`), a later one
        (which the conversation never took) is asked as a new question."""
        return await self._take_turn(None, who, webhook, background, edited, which)

    async def _take_turn(
        self,
        question: str | None,
        who: str,
        webhook: str | None,
        background: bool,
        edited: str | None = None,
        which: Which | None = None,
    ) -> bool:
        # The quotas are asked while the turn is taken, but nothing is stopped, here or
        # elsewhere, until they have said yes.
        admitted = asyncio.ensure_future(self.services.quotas.check(who))
        try:
            async with self.turn_lock:
                if self.replying:
                    await admitted
                await self._interrupt()
                if self._releasing is not None:  # a reply of ours gives its turn back as it ends
                    await self._releasing
                await self.relay.hold(admitted)
                return await self._start_turn(
                    question, who, admitted, webhook, background, edited, which
                )
        finally:
            if not admitted.done():
                admitted.cancel()
            elif not admitted.cancelled():
                admitted.exception()  # raised above, or moot: the turn failed before it

    async def _start_turn(
        self,
        question: str | None,
        who: str,
        admitted: asyncio.Future[None],
        webhook: str | None,
        background: bool,
        edited: str | None = None,
        which: Which | None = None,
    ) -> bool:
        """With the turn held: the quotas' answer, then the turn, or the turn given back."""
        quotas = self.services.quotas
        held: Held | None = None
        try:
            await admitted
            loading = self.relay.load()
            if loading is not None:
                held = await self._load_and_begin_reply(loading, who)
            elif question is not None or self.turns:
                held = await quotas.begin_reply(who)
            if question is None and not self.turns:
                await quotas.end_reply(held, None)
                await self._release()
                return False
            if which is not None and self.turns:
                edits, last = which(self.turns), len(self.turns) - 1
                if edits < last:
                    raise ChatError("bad_request", ONLY_THE_LAST)
                if edits > last:
                    # A question the client has and this conversation never took (one that
                    # was refused, say): asked now, as a new one.
                    question, edited = edited, None
            if question is None:
                record = self.turns[-1]
                record.restart()
                if edited is not None:
                    record.replaces, record.question = record.echo_seq, edited
                    self.seq += 1
                    record.echo_seq = self.seq
                    if record.position == 0:
                        self.title = title_for(edited)
            else:
                if self.title is None:
                    self.title = title_for(question)
                    self.created_at = now()
                self.seq += 1
                record = TurnRecord(position=len(self.turns), question=question, echo_seq=self.seq)
                self.turns.append(record)
            record.webhook = webhook
            record.background = background
            self.updated_at = now()
            # An edit is said back anew, as a question is; a regenerated question is not.
            self.relay.begin(record, regenerate=question is None and edited is None)
            if question is not None or edited is not None:
                echo = ChatResponse.echo(record.question, record.echo_seq, record.replaces)
                self.relay.send(echo)
            self._start(record, regenerate=question is None, held=held)
        except BaseException:
            await quotas.end_reply(held, None)
            await self._release()
            raise
        return True

    async def _load_and_begin_reply(self, loading: Awaitable[None], who: str) -> Held | None:
        """The conversation brought up to date while the reply's quota slot is taken."""
        quotas = self.services.quotas
        loaded, admitted = await asyncio.gather(
            loading, quotas.begin_reply(who), return_exceptions=True
        )
        if isinstance(admitted, BaseException):
            raise admitted
        if isinstance(loaded, BaseException):
            await quotas.end_reply(admitted, None)
            raise loaded
        return admitted

    async def stop(self) -> bool:
        """Stop the reply in flight, wherever it runs, and wait for its `end`; False if there
        was none."""
        return await self.stop_here() or await self.relay.stop_elsewhere()

    async def stop_here(self, because: ChatError | None = None) -> bool:
        """Stop the reply this worker runs, if any; False if there was none. With `because`,
        the reply ends with that error rather than as interrupted."""
        async with self.turn_lock:
            stopped = await self._interrupt(because)
        releasing = self._releasing
        if releasing is not None:
            await releasing
        return stopped

    def _start(self, record: TurnRecord, regenerate: bool, held: Held | None) -> None:
        settings = self.services.settings
        earlier = [
            (turn.question, turn.text, messages_from_dict(turn.exchanged))
            for turn in self.turns[: record.position]
            if turn.parts or turn.status == "completed"
        ]
        history = History.of(earlier, settings.chat_history_tokens)
        self.reply = asyncio.create_task(
            self._run(record, history, regenerate, held), name=f"reply-{self.id}"
        )

    async def _run(
        self, record: TurnRecord, history: History, regenerate: bool, held: Held | None
    ) -> None:
        # Every log line of this reply, and of the tasks it starts, names its conversation.
        logs.conversation_id.set(self.id)
        writer = self.services.writer
        self._streaming = record
        if not self.relay.keeps_live_turn:
            self._changed.add(record.position)
            writer.streaming(self, on=True)  # stored every tick as it grows
        elif not self._ever_stored:
            # Stored once as it begins, so the conversation is listed; then once it ends.
            self._changed.add(record.position)
            writer.changed(self)
        grace = (
            None
            if record.background
            else asyncio.create_task(self._mind_the_grace(), name=f"grace-{self.id}")
        )
        sink = LiveTurn(self, record, regenerate)
        turn = Turn(record.question, sink, record.parts, record.exchanged)
        try:
            await self.services.replier.answer(turn, history, self.assistant, self._context())
        finally:
            if grace is not None:
                grace.cancel()
                # Kept until its cancellation is through, so it is not collected mid-way.
                self._background.add(grace)
                grace.add_done_callback(self._background.discard)
            self._streaming = None
            self.updated_at = now()
            self._changed.add(record.position)
            if self.relay.keeps_live_turn:
                writer.changed(self)
            else:
                writer.streaming(self, on=False)
            if self.reply is asyncio.current_task():
                self.reply = None
            try:
                await self.services.quotas.end_reply(held, turn.usage)
            finally:
                # Not cut short by a question that pre-empts the reply: that question waits
                # for the turn to be given back.
                self._releasing = asyncio.create_task(self._release(), name=f"release-{self.id}")
                await asyncio.shield(self._releasing)

    def _context(self) -> dict[str, Any]:
        """What a user's chain is told of the conversation (its config's `configurable`)."""
        return chain_context(self.services.writer, self.owner, self.id)

    async def _release(self) -> None:
        try:
            await self.relay.release()
        finally:
            if self._releasing is asyncio.current_task():
                self._releasing = None
            if not self.clients:
                self.services.on_idle(self)

    async def _interrupt(self, because: ChatError | None = None) -> bool:
        reply, self.reply = self.reply, None
        if reply is None or reply.done():
            return False
        self.stopped_by = because
        # A library that swallows the cancellation would let the model run on unheard, so
        # cancel again until the task really ends.
        asked = time.perf_counter()
        while not reply.done():
            reply.cancel()
            await asyncio.wait([reply], timeout=RECANCEL_AFTER)
            if not reply.done():
                log.warning("reply ignored its cancellation; cancelling again")
        self.services.replier.metrics.stop_latency.observe(time.perf_counter() - asked)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            reply.result()
        self.stopped_by = None
        return True

    # Storage.

    def ended(self, record: TurnRecord) -> None:
        """A reply's `end` is out: the webhook events it makes are stored, soon."""
        webhooks = self.services.webhooks
        if not webhooks:
            return
        told = webhooks.for_reply(self.id, self.owner, self.assistant, record)
        if told:
            self._deliveries.extend(told)
            self.services.writer.soon()

    def take_deliveries(self) -> list[DeliveryRecord]:
        """The webhook events not stored yet, to be stored by whoever takes them."""
        taken, self._deliveries = self._deliveries, []
        return taken

    def adopt(self, record: TurnRecord) -> None:
        """A turn as it was ended elsewhere, in place of the one in memory."""
        self.turns[record.position : record.position + 1] = [record]
        self._changed.add(record.position)
        if self.title is None:
            self.title = title_for(record.question)

    def snapshot(self) -> ConversationRecord | None:
        """The row and the turns changed since the last snapshot, copied; None if unstored."""
        if self.title is None or self.deleted:
            return None
        changed = set(self._changed)
        self._changed.clear()
        streaming = self._streaming
        if streaming is not None:
            length = (len(streaming.parts), len(streaming.events))
            if length != self._saved_length:
                changed.add(streaming.position)
                self._saved_length = length
        turns = [
            replace(self.turns[position], events=list(self.turns[position].events))
            for position in sorted(changed)
            if position < len(self.turns)
        ]
        for turn in turns:
            turn.parts = [turn.text] if turn.parts else []
        self._ever_stored = True
        return ConversationRecord(
            id=self.id,
            title=self.title,
            created_at=self.created_at,
            updated_at=self.updated_at,
            last_seq=self.seq,
            turn_count=len(self.turns),
            turns=turns,
            owner=self.owner,
            assistant=self.assistant,
            deliveries=self.take_deliveries(),
        )

    def unsaved(self, record: ConversationRecord) -> None:
        self._changed.update(turn.position for turn in record.turns)
        self._saved_length = (-1, -1)
        self._deliveries[:0] = record.deliveries


async def hello(conversation: Conversation) -> ChatResponse:
    """The first frame on every socket: which conversation it is in."""
    turns = await conversation.turns_known()
    if conversation.stored or turns:
        text = f"Joined a conversation of {turns} turn{'s' if turns != 1 else ''}."
    else:
        text = "New conversation."
    frame = ChatResponse.bot("info", text)
    frame.conversation = conversation.id
    return frame
