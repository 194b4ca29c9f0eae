"""One WebSocket conversation: read client messages, run each reply as a cancellable task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from starlette import status
from starlette.websockets import WebSocket

from backend.config import Settings
from backend.errors import ChatError, ClientGone
from backend.history import History
from backend.inbound import parse_client_frame
from backend.outbox import Outbox
from backend.reply import Replier
from backend.turn import Turn
from schemas import ChatResponse, Question, Reset, Stop

log = logging.getLogger(__name__)

# Seconds a cancelled reply gets to wind down before it is cancelled again.
RECANCEL_AFTER = 0.25


class ChatSession:
    """Owns one socket, its conversation history and at most one reply in progress.

    The receive loop never awaits the chain: a question starts a reply task and the loop goes
    back to reading, so a stop, a reset or the next question can cancel that task at once.
    """

    def __init__(self, websocket: WebSocket, replier: Replier, settings: Settings) -> None:
        self.websocket = websocket
        self.replier = replier
        self.settings = settings
        self.history = History(settings.chat_history_tokens)
        self.outbox = Outbox(websocket.send_text)
        self.reply: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve the socket until the client leaves; then stop whatever is still running."""
        writer = asyncio.create_task(self.outbox.run(), name="chat-writer")
        try:
            while not writer.done():
                event = await self.websocket.receive()
                if event["type"] == "websocket.disconnect":
                    break
                await self.handle(event)
        except ClientGone as gone:
            log.warning("closing a session: %s", gone)
            with contextlib.suppress(Exception):
                await self.websocket.close(
                    code=status.WS_1008_POLICY_VIOLATION, reason="Too many unread frames."
                )
        finally:
            await self.interrupt()
            writer.cancel()
            await asyncio.wait([writer])

    async def handle(self, event: Mapping[str, Any]) -> None:
        """Act on one frame from the client."""
        try:
            message = parse_client_frame(
                event,
                max_frame_bytes=self.settings.chat_max_frame_bytes,
                max_question_chars=self.settings.chat_max_question_chars,
            )
        except ChatError as error:
            self.outbox.send(error.frame())
            return
        match message:
            case Question(message=text):
                await self.interrupt()
                self.outbox.send(ChatResponse.echo(text))
                self.reply = asyncio.create_task(self.answer(text), name="chat-reply")
            case Stop():
                if not await self.interrupt():
                    self.outbox.send(
                        ChatResponse.bot("info", "No reply is in progress; nothing to stop.")
                    )
            case Reset():
                await self.interrupt()
                self.history.clear()
                self.outbox.send(ChatResponse.bot("info", "Conversation cleared."))

    async def answer(self, question: str) -> None:
        """Run one reply; a client that left mid-reply simply ends it."""
        try:
            await self.replier.answer(Turn(question, self.outbox), self.history)
        except ClientGone:
            log.info("client left during a reply; generation stopped")

    async def interrupt(self) -> bool:
        """Cancel the reply in progress and wait for its `end` frame; False if there was none."""
        reply, self.reply = self.reply, None
        if reply is None or reply.done():
            return False
        # A library that swallows the cancellation would let the model run on unheard, so
        # cancel again until the task really ends.
        while not reply.done():
            reply.cancel()
            await asyncio.wait([reply], timeout=RECANCEL_AFTER)
            if not reply.done():
                log.warning("reply ignored its cancellation; cancelling again")
        return True
