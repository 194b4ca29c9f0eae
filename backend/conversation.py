"""One conversation while anyone uses it: its turns, its clients and its one reply in flight.

Every client joined to a conversation (sockets, SSE streams) gets the same frames with the same
`seq`. A question, stop, regenerate or reset from any of them acts on the conversation, which
runs at most one reply at a time. A reply outlives its clients by the resume grace, so a
client that reconnects finds it still going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any

from backend import logs
from backend.config import Settings
from backend.errors import SHARED_STATE_ERRORS, ChatError, ClientGone
from backend.history import History
from backend.outbox import Outbox
from backend.quotas import Held, Quotas
from backend.records import ConversationRecord, TurnRecord, now, title_for
from backend.reply import Replier
from backend.turn import Turn
from backend.write_behind import WriteBehind
from schemas import ChatResponse

log = logging.getLogger(__name__)

# Seconds a cancelled reply gets to wind down before it is cancelled again.
RECANCEL_AFTER = 0.25


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


@dataclass(frozen=True)
class Services:
    """What every conversation of an app shares."""

    replier: Replier
    settings: Settings
    writer: WriteBehind
    quotas: Quotas
    # Called when a conversation has no clients and no reply: it may leave memory.
    on_idle: Callable[[Conversation], None]


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

    def token(self, text: str) -> None:
        conversation = self.conversation
        if self.record.text_base is None:
            self.record.text_base = conversation.seq
        conversation.seq += len(text)
        conversation.deliver_token(text, conversation.seq)


class Conversation:
    """A conversation in memory; the store has everything it said once it is written."""

    def __init__(
        self,
        conversation_id: str,
        services: Services,
        record: ConversationRecord | None = None,
        owner: str = "",
    ) -> None:
        self.id = conversation_id
        self.services = services
        # The user it belongs to: nobody else may see it, join it or act on it.
        self.owner = record.owner if record else owner
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
        self._streaming: TurnRecord | None = None
        self._saved_length = (-1, -1)
        self._changed: set[int] = set()
        self._lock = asyncio.Lock()
        self._grace: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # `time.monotonic()` when it last had no client and no reply
        self._background: set[asyncio.Task[Any]] = set()

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
        """Whether a reply is in flight."""
        return self.reply is not None and not self.reply.done()

    # Frames.

    def emit(self, frame: ChatResponse) -> None:
        """Number `frame` as the conversation's next and send it to every client."""
        self.seq += 1
        frame.seq = self.seq
        self._broadcast(frame)

    def deliver_token(self, text: str, seq: int) -> None:
        """Send a piece of reply text, numbered `seq`, to every client."""
        lost: list[Outbox] = []
        for client in self.clients:
            try:
                client.token(text, seq)
            except ClientGone:
                lost.append(client)
        for client in lost:
            self.leave(client)

    def _broadcast(self, frame: ChatResponse) -> None:
        for client in tuple(self.clients):
            try:
                client.send(frame)
            except ClientGone:
                self.leave(client)

    def frames_after(self, after: int) -> Iterator[ChatResponse]:
        """Every frame with `seq` above `after`: the history, then the reply so far."""
        for turn in self.turns:
            if turn.last_seq > after:
                yield from turn.frames_after(after)

    # Clients.

    async def join(self, client: Outbox, after: int) -> None:
        """Send `client` what it missed after `after`, then every frame as it happens."""
        client.preload(self.frames_after(after))
        self.clients.add(client)
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def leave(self, client: Outbox) -> None:
        """`client` is gone; a reply nobody watches is stopped after the resume grace."""
        if client not in self.clients:
            return
        self.clients.discard(client)
        if self.clients:
            return
        if self.replying:
            grace = self.services.settings.chat_resume_grace
            if grace <= 0:
                self._spawn(self._stop_unwatched())
            elif self._grace is None:
                loop = asyncio.get_running_loop()
                self._grace = loop.call_later(grace, lambda: self._spawn(self._stop_unwatched()))
        else:
            self.services.on_idle(self)

    def let_go(self) -> None:
        """A request that held the conversation without joining it is done with it."""
        if self.idle:
            self.services.on_idle(self)

    async def reply_in_flight(self) -> int | None:
        """The `seq` just before the first frame of the reply in flight (its question said
        back), wherever it runs; None when there is none."""
        # A reply whose `end` is out is not in flight, though its task may still be closing.
        if not self.replying or not self.turns or self.turns[-1].status is not None:
            return None
        return self.turns[-1].echo_seq - 1

    def close_all(self, code: int, reason: str) -> list[Outbox]:
        """End every client's connection with `code`; the clients that were closed."""
        clients, self.clients = self.clients, set()
        for client in clients:
            client.close(code, reason)
        return list(clients)

    async def _stop_unwatched(self) -> None:
        self._grace = None
        if not self.clients and await self.stop():
            log.info("no client came back within the resume grace; reply stopped")

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(report_failure)

    # Acting on the conversation.

    async def ask(self, question: str, who: str) -> None:
        """Answer `question` from `who` (a user, or a client address), pre-empting the reply
        in flight; `RateLimited` if `who`'s quotas refuse it."""
        await self.services.quotas.check(who)
        async with self._lock:
            await self._interrupt()
            held = await self.services.quotas.begin_reply(who)
            if self.title is None:
                self.title = title_for(question)
                self.created_at = now()
            self.seq += 1
            record = TurnRecord(position=len(self.turns), question=question, echo_seq=self.seq)
            self.turns.append(record)
            self.updated_at = now()
            self._broadcast(ChatResponse.echo(question, seq=record.echo_seq))
            self._start(record, regenerate=False, held=held)

    async def regenerate(self, who: str) -> bool:
        """Answer the last question again in place of its reply; False if nothing was asked."""
        await self.services.quotas.check(who)
        async with self._lock:
            await self._interrupt()
            if not self.turns:
                return False
            held = await self.services.quotas.begin_reply(who)
            record = self.turns[-1]
            record.restart()
            self.updated_at = now()
            self._start(record, regenerate=True, held=held)
            return True

    async def stop(self) -> bool:
        """Stop the reply in flight and wait for its `end`; False if there was none."""
        return await self.stop_here()

    async def stop_here(self, because: ChatError | None = None) -> bool:
        """Stop the reply this worker runs, if any; False if there was none. With `because`,
        the reply ends with that error rather than as interrupted."""
        async with self._lock:
            return await self._interrupt(because)

    def _start(self, record: TurnRecord, regenerate: bool, held: Held | None) -> None:
        settings = self.services.settings
        earlier = [
            (turn.question, turn.text)
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
        self._changed.add(record.position)
        writer.streaming(self, on=True)
        turn = Turn(record.question, LiveTurn(self, record, regenerate), record.parts)
        try:
            await self.services.replier.answer(turn, history)
        finally:
            self._streaming = None
            self.updated_at = now()
            self._changed.add(record.position)
            writer.streaming(self, on=False)
            if self.reply is asyncio.current_task():
                self.reply = None
            if not self.clients:
                self.services.on_idle(self)
            await self.services.quotas.end_reply(held, turn.usage)

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
        return ConversationRecord(
            id=self.id,
            title=self.title,
            created_at=self.created_at,
            updated_at=self.updated_at,
            last_seq=self.seq,
            turn_count=len(self.turns),
            turns=turns,
            owner=self.owner,
        )

    def unsaved(self, record: ConversationRecord) -> None:
        self._changed.update(turn.position for turn in record.turns)
        self._saved_length = (-1, -1)


def hello(conversation: Conversation) -> ChatResponse:
    """The first frame on every socket: which conversation it is in."""
    if conversation.stored:
        turns = len(conversation.turns)
        text = f"Joined a conversation of {turns} turn{'s' if turns != 1 else ''}."
    else:
        text = "New conversation."
    frame = ChatResponse.bot("info", text)
    frame.conversation = conversation.id
    return frame
