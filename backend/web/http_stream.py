"""Replies as plain HTTP streams: chunked text for `curl --no-buffer`, and Server-Sent Events.

`/stream?prompt=` and `/sse?prompt=` answer one question with no conversation around it.
`/sse?conversation=ID` joins a stored conversation like a socket does, read-only: every event
carries `id: SEQ`, so a browser's `EventSource` resumes after the last one by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from backend.chat.conversation import Conversation, chain_context, hello
from backend.chat.conversations import Conversations
from backend.chat.outbox import Close, Outbox, Raw, TokenRun, seq_of
from backend.config.settings import Settings
from backend.model.history import History
from backend.model.reply import Replier
from backend.model.turn import Turn
from backend.observe.metrics import Metrics
from backend.protocol.errors import ChatError
from backend.protocol.inbound import check_question, parse_seq
from backend.users.auth import Principal
from backend.users.quotas import Held, Quotas, quota_key
from backend.web.access import Access
from backend.web.sse import STREAM_HEADERS
from schemas import ChatResponse, EndStatus

HOW_TO_ASK_HERE = "Pass it as ?prompt=... (or ?user_input=...)."
# How soon a browser's EventSource reconnects after the stream ends (a server restart).
RECONNECT_MS = 1000

# A queued item: a token's text, a whole frame, or None once the reply has ended.
Item = str | ChatResponse | None


class QueueSink:
    """A `FrameSink` that hands a reply's output to the response that streams it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def send(self, frame: ChatResponse) -> None:
        self.queue.put_nowait(frame)

    def token(self, text: str) -> None:
        self.queue.put_nowait(text)


class OneOff:
    """One stateless reply: its items as they are produced, then its quotas settled.

    If the consumer goes away (the HTTP client hung up), the reply task is cancelled, which
    closes the upstream request. `settle` runs after the response, however it ended, even if
    the reply never started.
    """

    def __init__(
        self,
        replier: Replier,
        question: str,
        history: History,
        quotas: Quotas,
        held: Held | None,
        assistant: str | None,
        context: dict[str, Any],
    ) -> None:
        self.replier = replier
        self.assistant = assistant
        self.context = context
        self.history = history
        self.quotas = quotas
        self.held = held
        self.sink = QueueSink()
        self.turn = Turn(question, self.sink)
        self.task: asyncio.Task[EndStatus] | None = None

    async def items(self) -> AsyncIterator[str | ChatResponse]:
        """Everything the reply produces, as it is produced."""
        sink = self.sink
        self.task = task = asyncio.create_task(
            self.replier.answer(self.turn, self.history, self.assistant, self.context),
            name="http-reply",
        )
        task.add_done_callback(lambda _: sink.queue.put_nowait(None))
        try:
            while (item := await sink.queue.get()) is not None:
                yield item
        finally:
            task.cancel()

    async def settle(self) -> None:
        """Wait for the reply to end, then give its slot back and charge its tokens."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])
        await self.quotas.end_reply(self.held, self.turn.usage)


async def as_text(items: AsyncIterator[str | ChatResponse]) -> AsyncIterator[str]:
    """Tokens as they come; a failure after the headers went out becomes a last `[error]` line."""
    async for item in items:
        if isinstance(item, str):
            yield item
        elif item.type == "error":
            yield f"\n[error] {item.message}\n"
        elif item.type == "end" and item.status == "completed":
            yield "\n"


def event(item: ChatResponse | TokenRun | Raw) -> str:
    """One SSE event: the frame's JSON, with its `seq` as the event id when it has one."""
    seq = seq_of(item)
    if seq is None:
        return f"data: {item.to_json()}\n\n"
    return f"id: {seq}\ndata: {item.to_json()}\n\n"


async def as_events(items: AsyncIterator[str | ChatResponse]) -> AsyncIterator[str]:
    """Each frame, `start` to `end`, as one SSE event whose data is the frame's JSON."""
    async for item in items:
        if isinstance(item, str):
            item = ChatResponse.tokens(item)
        yield event(item)


async def joined_events(
    conversation: Conversation, after: int, metrics: Metrics
) -> AsyncIterator[str]:
    """A conversation's frames after `after`, then live, as SSE, until the client leaves."""
    outbox = Outbox()
    outbox.send(await hello(conversation))
    await conversation.join(outbox, after)
    open_streams = metrics.connections.labels("sse")
    open_streams.inc()
    try:
        yield f"retry: {RECONNECT_MS}\n\n"
        while True:
            chunk: list[str] = []
            for item in await outbox.take():
                if isinstance(item, Close):
                    yield "".join(chunk)
                    return
                chunk.append(event(item))
            yield "".join(chunk)
    finally:
        open_streams.dec()
        outbox.stop()
        conversation.leave(outbox)


def resume_point(request: Request) -> int:
    """The `seq` to resume after: `Last-Event-ID` (an EventSource reconnecting), else `?after=`."""
    value = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        return parse_seq(value)
    except ValueError as bad:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(bad)) from bad


def build_router(
    replier: Replier, conversations: Conversations, settings: Settings, access: Access
) -> APIRouter:
    """`GET /stream` and `GET /sse`."""
    router = APIRouter()
    quotas = conversations.quotas

    def question_from(request: Request) -> str:
        params = request.query_params
        text = params.get("prompt", params.get("user_input"))
        if text is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"Missing question. {HOW_TO_ASK_HERE}"
            )
        try:
            return check_question(text, settings.chat_max_question_chars, HOW_TO_ASK_HERE)
        except ChatError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, error.message) from error

    async def reply_to(request: Request, caller: Principal) -> OneOff:
        """The one-off reply a request asks for, admitted by the caller's quotas (or 429)."""
        question = question_from(request)
        assistant = replier.assistants.check(request.query_params.get("assistant"))
        access.ensure_open()
        who = quota_key(caller, request.client)
        await quotas.check(who)
        held = await quotas.begin_reply(who)
        history = History(settings.chat_history_tokens)
        context = chain_context(conversations.writer, caller.user, None)
        return OneOff(replier, question, history, quotas, held, assistant, context)

    @router.get(
        "/stream",
        summary="Stream a reply as plain text",
        responses={429: {"description": "A quota of the caller's is used up"}},
    )
    async def stream(
        request: Request,
        caller: Principal = Depends(access.stream_caller),  # noqa: B008
    ) -> StreamingResponse:
        reply = await reply_to(request, caller)
        return StreamingResponse(
            as_text(reply.items()),
            media_type="text/plain; charset=utf-8",
            headers=STREAM_HEADERS,
            background=BackgroundTask(reply.settle),
        )

    @router.get(
        "/sse",
        summary="Stream a reply (?prompt=), or join a conversation (?conversation=), as SSE",
        responses={
            404: {"description": "No such conversation"},
            429: {"description": "A quota of the caller's is used up"},
        },
    )
    async def sse(
        request: Request,
        caller: Principal = Depends(access.stream_caller),  # noqa: B008
    ) -> StreamingResponse:
        conversation_id = request.query_params.get("conversation")
        if conversation_id is None:
            reply = await reply_to(request, caller)
            return StreamingResponse(
                as_events(reply.items()),
                media_type="text/event-stream",
                headers=STREAM_HEADERS,
                background=BackgroundTask(reply.settle),
            )
        after = resume_point(request)
        if after:
            replier.metrics.resumes.inc()
        access.ensure_open()
        slot = await access.slot(caller, request.client)
        try:
            assistant = request.query_params.get("assistant")
            conversation = await conversations.open(conversation_id, caller.user, after, assistant)
        except BaseException:
            await slot.release()
            raise
        return StreamingResponse(
            joined_events(conversation, after, replier.metrics),
            media_type="text/event-stream",
            headers=STREAM_HEADERS,
            background=BackgroundTask(slot.release),
        )

    return router
