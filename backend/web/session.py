"""One WebSocket: read the client's messages and act on its conversation; write what it is sent.

The receive loop never awaits a reply: a question starts the conversation's reply task and the
loop goes back to reading, so a stop, a reset or the next question acts at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from backend.chat.conversation import Conversation, hello
from backend.chat.conversations import Conversations
from backend.chat.outbox import Close, Outbox, Pending
from backend.config.settings import Settings
from backend.observe import logs
from backend.protocol.errors import SHARED_STATE_ERRORS, UNREACHABLE, ChatError
from backend.protocol.inbound import parse_client_frame
from backend.users.auth import Principal
from backend.users.quotas import quota_key
from schemas import ChatResponse, Question, Regenerate, Reset, Stop

log = logging.getLogger(__name__)

# The close code of a socket whose credential expired (the private range, after HTTP's 401).
CLOSE_UNAUTHORIZED = 4401
EXPIRED = "Your sign-in has expired. Sign in again and reconnect to carry on where you were."


async def write(outbox: Outbox, websocket: WebSocket, direct: bool = True) -> None:
    """Send what `outbox` queues, in order, until a `Close` or the socket fails; with
    `direct`, a lone token is sent by the reply's own task."""
    outbox.attach(websocket.send_text if direct else None)
    try:
        # Nothing sent is kept while the socket waits for more: an idle socket holds no frame.
        while await send_all(await outbox.take(), websocket):
            pass
    except (WebSocketDisconnect, OSError, RuntimeError) as exc:
        # Starlette raises WebSocketDisconnect for a peer that left, RuntimeError for a
        # socket already closed on our side.
        log.debug("socket writer stopped: %r", exc)
    finally:
        outbox.stop()


async def send_all(items: list[Pending], websocket: WebSocket) -> bool:
    """Send `items` in order; False once one was a `Close` (the socket is closed then)."""
    for item in items:
        if isinstance(item, Close):
            await websocket.close(code=item.code, reason=item.reason)
            return False
        await websocket.send_text(item.to_json())
    return True


class ChatSession:
    """Owns one socket and the conversation it is joined to (which may change on reset)."""

    def __init__(
        self,
        websocket: WebSocket,
        conversations: Conversations,
        settings: Settings,
        principal: Principal,
    ) -> None:
        self.websocket = websocket
        self.conversations = conversations
        self.settings = settings
        self.principal = principal
        self.who = quota_key(principal, websocket.client)
        self.outbox = Outbox()

    async def run(self, conversation: Conversation, after: int) -> None:
        """Serve the socket until the client leaves; its conversation carries on without it."""
        self.conversation = conversation
        logs.conversation_id.set(conversation.id)
        self.outbox.send(await hello(conversation))
        await conversation.join(self.outbox, after)
        writer = asyncio.create_task(
            write(self.outbox, self.websocket, self.settings.chat_speedups), name="chat-writer"
        )
        expiry = self._close_on_expiry()
        try:
            while not writer.done():
                event = await self.websocket.receive()
                if event["type"] == "websocket.disconnect":
                    break
                await self.handle(event)
        finally:
            if expiry is not None:
                expiry.cancel()
            self.conversation.leave(self.outbox)
            writer.cancel()
            await asyncio.wait([writer])

    def _close_on_expiry(self) -> asyncio.TimerHandle | None:
        """When the caller's credential expires, say so and close the socket (4401): the
        conversation and its reply go on, for the client to rejoin with a fresh token."""
        left = self.principal.expires_in()
        if left is None:
            return None
        return asyncio.get_running_loop().call_later(max(0.0, left), self._expired)

    def _expired(self) -> None:
        self.reply_only(ChatError("unauthorized", EXPIRED).frame())
        self.outbox.close(CLOSE_UNAUTHORIZED, "Token expired")

    async def handle(self, event: Mapping[str, Any]) -> None:
        """Act on one frame from the client."""
        try:
            message = parse_client_frame(
                event,
                max_frame_bytes=self.settings.chat_max_frame_bytes,
                max_question_chars=self.settings.chat_max_question_chars,
            )
        except ChatError as error:
            self.reply_only(error.frame())
            return
        if self.conversations.draining and isinstance(message, Question | Regenerate):
            self.reply_only(
                ChatError(
                    "shutting_down", "The server is restarting; ask again in a moment."
                ).frame()
            )
            return
        try:
            await self.act(message)
        except ChatError as error:
            self.reply_only(error.frame())
        except SHARED_STATE_ERRORS as exc:
            log.warning("shared state out of reach: %s", exc)
            self.reply_only(ChatError("unavailable", UNREACHABLE).frame())

    async def act(self, message: Question | Stop | Reset | Regenerate) -> None:
        """Carry out one client message on the conversation."""
        conversation = self.conversation
        match message:
            case Question(message=text):
                await conversation.ask(text, self.who)
            case Stop():
                if not await conversation.stop():
                    self.reply_only(
                        ChatResponse.bot("info", "No reply is in progress; nothing to stop.")
                    )
            case Regenerate(message=edited):
                if not await conversation.regenerate(self.who, edited=edited):
                    self.reply_only(
                        ChatError("bad_request", "There is no question to answer again.").frame()
                    )
            case Reset():
                await conversation.stop()
                conversation.leave(self.outbox)
                # The new conversation is answered by the same assistant.
                assistant = conversation.assistant
                self.conversation = fresh = self.conversations.new(self.principal.user, assistant)
                logs.conversation_id.set(fresh.id)
                await fresh.join(self.outbox, 0)
                ack = ChatResponse.bot("info", "Conversation cleared.")
                ack.conversation = fresh.id
                fresh.emit(ack)

    def reply_only(self, frame: ChatResponse) -> None:
        """A frame for this socket alone (no `seq`)."""
        if not self.outbox.gone:
            self.outbox.send(frame)
