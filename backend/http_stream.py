"""Replies as plain HTTP streams: chunked text for `curl --no-buffer`, and Server-Sent Events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import StreamingResponse

from backend.config import Settings
from backend.errors import ChatError
from backend.history import History
from backend.inbound import check_question
from backend.origin import origin_refusal
from backend.reply import Replier
from backend.turn import Turn
from schemas import ChatResponse

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

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


async def reply_items(
    replier: Replier, question: str, history: History
) -> AsyncIterator[str | ChatResponse]:
    """Everything one stateless reply produces, as it is produced.

    If the consumer goes away (the HTTP client hung up), the reply task is cancelled, which
    closes the upstream request.
    """
    sink = QueueSink()
    task = asyncio.create_task(replier.answer(Turn(question, sink), history), name="http-reply")
    task.add_done_callback(lambda _: sink.queue.put_nowait(None))
    try:
        while (item := await sink.queue.get()) is not None:
            yield item
    finally:
        task.cancel()


async def as_text(items: AsyncIterator[str | ChatResponse]) -> AsyncIterator[str]:
    """Tokens as they come; a failure after the headers went out becomes a last `[error]` line."""
    async for item in items:
        if isinstance(item, str):
            yield item
        elif item.type == "error":
            yield f"\n[error] {item.message}\n"
        elif item.type == "end" and item.status == "completed":
            yield "\n"


async def as_events(items: AsyncIterator[str | ChatResponse]) -> AsyncIterator[str]:
    """Each frame, `start` to `end`, as one SSE event whose data is the frame's JSON."""
    async for item in items:
        if isinstance(item, str):
            item = ChatResponse.tokens(item)
        yield f"data: {item.to_json()}\n\n"


def build_router(replier: Replier, settings: Settings) -> APIRouter:
    """`GET /stream` and `GET /sse`."""
    router = APIRouter()

    def question_from(request: Request) -> str:
        refused = origin_refusal(request.headers, settings.chat_allowed_origins)
        if refused is not None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, refused)
        params = request.query_params
        text = params.get("prompt", params.get("user_input"))
        if text is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "Missing question: pass it as ?prompt=... (or ?user_input=...).",
            )
        try:
            return check_question(text, settings.chat_max_question_chars)
        except ChatError as error:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, error.message) from error

    def reply_to(request: Request) -> AsyncIterator[str | ChatResponse]:
        history = History(settings.chat_history_tokens)
        return reply_items(replier, question_from(request), history)

    @router.get("/stream", summary="Stream a reply as plain text")
    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(
            as_text(reply_to(request)),
            media_type="text/plain; charset=utf-8",
            headers=STREAM_HEADERS,
        )

    @router.get("/sse", summary="Stream a reply as Server-Sent Events")
    async def sse(request: Request) -> StreamingResponse:
        return StreamingResponse(
            as_events(reply_to(request)), media_type="text/event-stream", headers=STREAM_HEADERS
        )

    return router
