"""The Vercel AI SDK's chat routes: `useChat` and `DefaultChatTransport` against our conversations.

- `POST /api/chat`: what the transport sends (`id`, `messages`, `trigger`, `messageId`),
  answered with the UI message stream (`backend/web/ui_stream.py`) of the reply it starts.
- `GET /api/chat/{id}/stream`: the reply in flight, from its start (the SDK replays it), or
  204 when there is none: `useChat({ resume: true })` after a reload.
- `POST /api/chat/{id}/stop`: stop the reply in flight, as a `stop` frame does.
- `GET /api/chat/{id}`: the chat's messages as UI messages, to start `useChat` with.

Their errors are plain-text sentences (`{"detail": ...}` for a client that asks for JSON):
the SDK throws a failed response's body as its error's message, which apps show as it is.

A chat is one of our stored conversations, run by the same session core as a socket. The
conversation's own history is what the model sees: of the messages the client sends, only the
last one (the new question) is read. A dropped request is a dropped client: its reply goes on
for the resume grace, so a reload finds it; only the stop request stops it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from backend.chat.conversation import Conversation, Which
from backend.chat.conversations import ID_PATTERN, Conversations, UnknownConversation
from backend.chat.outbox import Outbox, SendText
from backend.config.settings import Settings
from backend.observe.metrics import Metrics
from backend.protocol.errors import ChatError
from backend.protocol.inbound import check_question
from backend.store.records import ConversationRecord, TurnRecord
from backend.users.auth import Principal
from backend.users.quotas import RateLimited
from backend.web.access import Access, Slot
from backend.web.http_errors import refusal, unprocessable
from backend.web.sse import EventStream
from backend.web.ui_stream import (
    HEADERS,
    data_part,
    message_id,
    step_part,
    write_reply,
)

MAX_CHAT_ID = 256
NOTHING_TO_REGENERATE = "Nothing was asked in this chat yet, so nothing to regenerate."
EMPTY_QUESTION = "The question is empty."


class TextPart(BaseModel):
    """A part of a UI message; only text parts are read."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = ""
    role: Literal["system", "user", "assistant"]
    parts: list[TextPart] = Field(default_factory=list)


class ChatRequest(BaseModel):
    """The body `DefaultChatTransport` posts (plus whatever the app adds with `body`)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1, max_length=MAX_CHAT_ID)
    # Only the last message is read (the stored conversation is what the model sees), so only
    # it is validated, however long the chat has grown.
    messages: list[Any] = Field(default_factory=list)
    trigger: Literal["submit-message", "regenerate-message"] = "submit-message"
    messageId: str | None = None
    # The assistant that answers a new chat (`GET /api/assistants`); the default if absent.
    assistant: str | None = Field(default=None, max_length=64)


class SentenceErrors(APIRoute):
    """A route whose error responses are the sentence alone, as text, unless JSON is asked for.

    `DefaultChatTransport` makes a failed response's whole body its error's message, which
    apps show as it is: a sentence reads well there, `{"detail": ...}` does not.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except Exception as failure:
                # The app's own handler answers, so status and headers (`Retry-After`,
                # `WWW-Authenticate`) stay what every other route sends.
                answer = await app_answer(request, failure)
                if answer is None:
                    raise
                return answer if wants_json(request) else as_sentence(answer)

        return handler


async def app_answer(request: Request, failure: Exception) -> Response | None:
    """The response the app's exception handlers give for `failure`, if one handles it."""
    handlers = request.app.exception_handlers
    for kind in type(failure).__mro__:
        handler = handlers.get(kind)
        if handler is not None:
            result = handler(request, failure)
            answer: Response = await result if inspect.isawaitable(result) else result
            return answer
    return None


def wants_json(request: Request) -> bool:
    """Whether the client asked for JSON (`Accept: application/json`)."""
    return "application/json" in request.headers.get("accept", "")


def as_sentence(answer: Response) -> Response:
    """A JSON `{"detail": "..."}` error as its sentence in plain text, with the same headers."""
    try:
        detail = json.loads(bytes(answer.body)).get("detail")
    except (ValueError, AttributeError):
        return answer
    if not isinstance(detail, str):
        return answer
    headers = {
        name: value
        for name, value in answer.headers.items()
        if name not in ("content-length", "content-type")
    }
    return PlainTextResponse(detail, answer.status_code, headers=headers)


def sentences(refusals: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these refusals (status: why), each told as plain text."""
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {code: {"description": why, "content": text} for code, why in refusals.items()}


# What any of the routes may be refused with, besides what each says of its own.
REFUSALS = {
    401: "No valid bearer token, with CHAT_AUTH=token",
    403: "A request from another site's page",
    422: "A malformed request",
    503: "The server is restarting, or cannot reach its shared state",
}


def conversation_id_for(chat_id: str, owner: str) -> str:
    """The conversation a chat id stands for: derived from its owner, so users cannot meet."""
    return hashlib.sha256(f"{owner}\0{chat_id}".encode()).hexdigest()[:32]


async def chat_request(request: Request) -> ChatRequest:
    """The request's body, or 422 with a sentence that says what is wrong with it."""
    try:
        body: Any = json.loads(await request.body())
    except ValueError as exc:
        raise unprocessable("The body must be JSON, as DefaultChatTransport sends.") from exc
    except RecursionError as exc:
        # json's own guard: a body of a few kilobytes can nest deeper than the parser may go.
        raise unprocessable("The body's JSON nests too deeply to be a chat request.") from exc
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid(exc, "") from exc


def invalid(error: ValidationError, within: str) -> HTTPException:
    """A 422 naming the first thing wrong in a part of the body."""
    first = error.errors()[0]
    where = ".".join([within, *(str(part) for part in first["loc"])]).strip(".") or "body"
    return unprocessable(f"Bad chat request: {where}: {first['msg']}.")


def question_of(chat: ChatRequest, max_chars: int) -> str:
    """The new question: the text of the last message, which must be the user's."""
    if not chat.messages:
        raise unprocessable("The last message must be the user's new question.")
    try:
        last = UIMessage.model_validate(chat.messages[-1])
    except ValidationError as exc:
        raise invalid(exc, f"messages.{len(chat.messages) - 1}") from exc
    if last.role != "user":
        raise unprocessable("The last message must be the user's new question.")
    text = "".join(part.text or "" for part in last.parts if part.type == "text")
    if not text.strip():
        # Said without the socket's advice on how to frame a question: an app shows it as is.
        raise unprocessable(EMPTY_QUESTION)
    try:
        return check_question(text, max_chars)
    except ChatError as error:
        raise unprocessable(error.message) from error


def edited_question(chat: ChatRequest) -> Which | None:
    """For a request that edits a question (`sendMessage` with the `messageId` of a user
    message: the messages up to it, its new text last), how to tell which one it is.

    An id this server gave (a chat started from `GET /api/chat/{id}`) names its turn. The SDK
    keeps the id a question asked in the browser got there, which the server never saw: that
    one is told by how many questions the request carries.
    """
    if chat.trigger != "submit-message" or chat.messageId is None:
        return None
    message_id = chat.messageId
    asked = sum(1 for m in chat.messages if isinstance(m, dict) and m.get("role") == "user")

    def which(turns: list[TurnRecord]) -> int:
        for turn in turns:
            if message_id in (f"u{turn.echo_seq}", f"u{turn.replaces}"):
                return turn.position
        return asked - 1

    return which


async def find(conversations: Conversations, chat_id: str, owner: str) -> Conversation | None:
    """The conversation of `owner`'s chat `chat_id`, or None if there is none.

    A chat id that is one of the owner's conversation ids (from `/conversations`, or the web
    client's URL) is that conversation; any other id stands for a conversation of its own.
    """
    return await first_open(conversations, conversation_ids(chat_id, owner), owner)


async def find_or_begin(
    conversations: Conversations, chat_id: str, owner: str, assistant: str | None = None
) -> Conversation:
    """The conversation of `owner`'s chat `chat_id`, begun, answered by `assistant`, if
    there is none yet."""
    *own, derived = conversation_ids(chat_id, owner)
    found = await first_open(conversations, own, owner, assistant)
    return found or await conversations.open_or_begin(derived, owner, assistant)


async def first_open(
    conversations: Conversations,
    conversation_ids: list[str],
    owner: str,
    assistant: str | None = None,
) -> Conversation | None:
    """The first of `owner`'s conversations by these ids that exists, opened; or None."""
    for conversation_id in conversation_ids:
        try:
            return await conversations.open(conversation_id, owner, assistant=assistant)
        except UnknownConversation:
            pass
    return None


def conversation_ids(chat_id: str, owner: str) -> list[str]:
    """The conversations a chat id may stand for, in the order to try them: the id itself if
    it is a conversation id, then the one derived from it (where a new chat begins)."""
    derived = conversation_id_for(chat_id, owner)
    return [chat_id, derived] if ID_PATTERN.fullmatch(chat_id) else [derived]


def ui_messages(record: ConversationRecord) -> list[dict[str, Any]]:
    """A stored conversation as the SDK's UI messages, with the ids its streams use."""
    messages: list[dict[str, Any]] = []
    for turn in record.turns:
        messages.append(
            {
                "id": f"u{turn.echo_seq}",
                "role": "user",
                "parts": [{"type": "text", "text": turn.question}],
            }
        )
        reply = assistant_message(record.id, turn)
        if reply is not None:
            messages.append(reply)
    return messages


def assistant_message(conversation_id: str, turn: TurnRecord) -> dict[str, Any] | None:
    start = next((event for event in turn.events if event.type == "start"), None)
    if start is None or start.seq is None:
        return None
    metadata: dict[str, Any] = {"conversation": conversation_id, "seq": start.seq}
    if turn.status is not None:
        metadata["status"] = turn.status
    if turn.usage is not None:
        metadata["usage"] = turn.usage.model_dump()
    ended = turn.events[-1] if turn.status is not None and turn.events else None
    if ended is not None and ended.timings is not None:
        metadata["timings"] = ended.timings.model_dump()
    return {
        "id": message_id(start.seq),
        "role": "assistant",
        "parts": reply_parts(turn),
        "metadata": metadata,
    }


def reply_parts(turn: TurnRecord) -> list[dict[str, Any]]:
    """A stored reply's parts, as its stream gave them: its text, cut where a tool was called
    (each tool call a `dynamic-tool` part in its place), then its `info` and `error` frames as
    data parts."""
    state = "done" if turn.status else "streaming"
    text, base, cursor = turn.text, turn.text_base or 0, 0
    parts: list[dict[str, Any]] = []
    data: list[dict[str, Any]] = []
    tools: dict[str, dict[str, Any]] = {}
    for event in turn.events:
        step = event.step
        if step is not None and step.kind == "tool":
            detail = step.detail
            if step.status == "started":
                # The characters of the reply written before the call: `seq`s up to its own.
                cut = max(cursor, min(len(text), (event.seq or 0) - base - 1))
                parts.append({"type": "text", "text": text[cursor:cut], "state": "done"})
                cursor = cut
                tools[step.id] = {
                    "type": "dynamic-tool",
                    "toolName": step.name,
                    "toolCallId": step.id,
                    "providerExecuted": True,
                    "state": "input-available",
                    "input": detail.arguments if detail else None,
                }
                parts.append(tools[step.id])
            elif step.id in tools and step.status == "completed":
                result = detail.result if detail else None
                tools[step.id].update(state="output-available", output=result)
            elif step.id in tools:
                error = (detail.error if detail else None) or ""
                tools[step.id].update(state="output-error", errorText=error)
        elif step is not None:  # a step's end in place of its start, as `useChat` keeps it
            part = step_part(event.model_dump(exclude_none=True))
            data = [kept for kept in data if kept.get("id") != part["id"]] + [part]
        elif event.type in ("info", "error"):
            data.append(data_part(event.model_dump(exclude_none=True)))
    parts.append({"type": "text", "text": text[cursor:], "state": state})
    return [*parts, *data]


def build_router(
    conversations: Conversations, settings: Settings, access: Access, metrics: Metrics
) -> APIRouter:
    """The AI SDK's `/api/chat` routes."""
    router = APIRouter(prefix="/api/chat", tags=["Vercel AI SDK"], route_class=SentenceErrors)

    async def follow(conversation: Conversation, after: int, slot: Slot) -> EventStream:
        """Stream the next reply after `after` to this request; it holds `slot` till then."""
        outbox = Outbox()
        await conversation.join(outbox, after)

        async def write(send: SendText) -> None:
            open_streams = metrics.connections.labels("sse")
            open_streams.inc()
            try:
                await write_reply(outbox, conversation.id, send, settings.chat_speedups)
            finally:
                open_streams.dec()
                outbox.stop()
                conversation.leave(outbox)

        async def done() -> None:
            outbox.stop()
            conversation.leave(outbox)  # if the stream never began
            await slot.release()

        return EventStream(write, HEADERS, BackgroundTask(done))

    @router.post(
        "",
        summary="Answer a chat's new message (or regenerate) as a UI message stream",
        responses=sentences(
            {
                **REFUSALS,
                422: "A malformed request, or nothing to regenerate",
                429: "A quota of the caller's is used up",
            }
        ),
    )
    async def chat(
        request: Request,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> EventStream:
        body = await chat_request(request)
        regenerate = body.trigger == "regenerate-message"
        question = None if regenerate else question_of(body, settings.chat_max_question_chars)
        access.ensure_open()
        # Taken before anything is asked of the model: a refused stream costs no tokens.
        slot = await access.slot(caller, request.client)
        who = slot.who
        try:
            conversation = await find_or_begin(conversations, body.id, caller.user, body.assistant)
            try:
                which = edited_question(body)
                if question is not None and which is not None:
                    if not await conversation.regenerate(who, edited=question, which=which):
                        await conversation.ask(question, who)  # nothing here to edit yet
                elif question is not None:
                    await conversation.ask(question, who)
                elif not await conversation.regenerate(who):
                    raise unprocessable(NOTHING_TO_REGENERATE)
            except BaseException:
                conversation.drop_if_idle()
                raise
        except BaseException as failed:
            await slot.release()
            if isinstance(failed, ChatError) and not isinstance(failed, RateLimited):
                raise refusal(failed) from failed
            raise
        # The reply's own frames come after this `seq` (its task has not run yet).
        after = conversation.seq
        # Let the reply send its request to the model before this one's response is set up,
        # as a socket's session does by waiting for the next message: the model's time to
        # first token then hides that work instead of adding to it.
        await asyncio.sleep(0)
        return await follow(conversation, after, slot)

    @router.get(
        "/{chat_id}/stream",
        summary="The chat's reply in flight, from its start, as a UI message stream",
        responses={
            204: {"description": "No reply is in flight"},
            **sentences({**REFUSALS, 429: "A quota of the caller's is used up"}),
        },
    )
    async def resume(
        chat_id: str,
        request: Request,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> Response:
        conversation = await find(conversations, chat_id, caller.user)
        if conversation is None:
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        try:
            after = await conversation.reply_in_flight()
        except ChatError as error:
            conversation.drop_if_idle()
            raise refusal(error) from error
        if after is None:
            conversation.drop_if_idle()
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        try:
            slot = await access.slot(caller, request.client)
        except BaseException:
            conversation.drop_if_idle()
            raise
        metrics.resumes.inc()
        return await follow(conversation, after, slot)

    @router.post(
        "/{chat_id}/stop",
        summary="Stop the chat's reply in flight; its text so far is kept",
        responses=sentences({**REFUSALS, 404: "No such chat"}),
    )
    async def stop(
        chat_id: str,
        request: Request,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> dict[str, bool]:
        conversation = await find(conversations, chat_id, caller.user)
        if conversation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"No chat {chat_id[:64]!r}.")
        try:
            stopped = await conversation.stop()
        except ChatError as error:
            raise refusal(error) from error
        finally:
            conversation.drop_if_idle()
        return {"stopped": stopped}

    @router.get(
        "/{chat_id}",
        summary="The chat's messages, as UI messages",
        responses=sentences({**REFUSALS, 404: "No such chat"}),
    )
    async def messages(
        chat_id: str,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> dict[str, Any]:
        for conversation_id in conversation_ids(chat_id, caller.user):
            record = await conversations.read(conversation_id, caller.user)
            if record is not None:
                break
        else:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"No chat {chat_id[:64]!r}.")
        return {"id": chat_id, "conversation": record.id, "messages": ui_messages(record)}

    return router
