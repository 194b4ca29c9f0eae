"""`/api/conversations`: list, read and delete stored conversations; `/api/assistants`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status

from backend.chat.conversations import ID_PATTERN, Conversations
from backend.model.assistants import Assistants
from backend.store.records import ConversationRecord, ConversationSummary, TurnRecord
from backend.users.auth import Principal
from backend.web.access import Access
from schemas import Step, StepDetail
from schemas import conversations as api

# Past any real list, and far inside what SQLite's and PostgreSQL's OFFSET take (64 bits).
MAX_OFFSET = 1_000_000_000
# A search is a few words (see `backend/store/search.py`).
MAX_SEARCH = 200


def summary_of(row: ConversationSummary) -> api.ConversationSummary:
    return api.ConversationSummary(
        id=row.id,
        title=row.title,
        created=row.created_at,
        updated=row.updated_at,
        messages=row.turn_count * 2,
        assistant=row.assistant,
    )


def conversation_of(record: ConversationRecord) -> api.Conversation:
    messages: list[api.Message] = []
    for turn in record.turns:
        messages.append(api.Message(role="user", text=turn.question, time=turn.asked_at))
        messages.append(
            api.Message(
                role="assistant",
                text=turn.text,
                time=turn.asked_at,
                status=turn.status or "streaming",
                usage=turn.usage,
                steps=steps_of(turn) or None,
            )
        )
    return api.Conversation(
        id=record.id,
        title=record.title,
        created=record.created_at,
        updated=record.updated_at,
        assistant=record.assistant,
        messages=messages,
    )


def steps_of(turn: TurnRecord) -> list[Step]:
    """Each step of a reply once, as it stands: its end's status and detail over its start's."""
    steps: dict[str, Step] = {}
    for event in turn.events:
        step = event.step
        if step is None:
            continue
        known = steps.get(step.id)
        if known is None:
            steps[step.id] = step.model_copy(deep=True)
            continue
        detail = {
            **(known.detail.model_dump(exclude_none=True) if known.detail else {}),
            **(step.detail.model_dump(exclude_none=True) if step.detail else {}),
        }
        steps[step.id] = step.model_copy(update={"detail": StepDetail(**detail)})
    return list(steps.values())


def build_api(conversations: Conversations, access: Access) -> APIRouter:
    """The REST routes over `conversations`: each caller sees its own conversations only."""
    router = APIRouter(prefix="/api/conversations", tags=["conversations"])

    def not_found(conversation_id: str) -> HTTPException:
        return HTTPException(
            status.HTTP_404_NOT_FOUND, f"No conversation {conversation_id[:64]!r}."
        )

    @router.get(
        "",
        summary="List conversations, most recently updated first; search them with `q`",
    )
    async def list_conversations(
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        q: Annotated[
            str,
            Query(
                max_length=MAX_SEARCH,
                description="Words to find: a conversation is listed when its title, or one "
                "of its finished questions with its reply, has a word starting with each "
                "(any case). Blank: every conversation.",
            ),
        ] = "",
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> api.ConversationPage:
        # What is only in memory yet is written first, so the list is never behind the chat.
        await conversations.writer.flush()
        rows = await conversations.store.page(caller.user, limit + 1, offset, q)
        return api.ConversationPage(
            conversations=[summary_of(row) for row in rows[:limit]],
            next_offset=offset + limit if len(rows) > limit else None,
        )

    @router.get("/{conversation_id}", summary="A conversation with all its messages")
    async def get_conversation(
        conversation_id: str,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> api.Conversation:
        if not ID_PATTERN.fullmatch(conversation_id):
            raise not_found(conversation_id)
        record = await conversations.read(conversation_id, caller.user)
        if record is None:
            raise not_found(conversation_id)
        return conversation_of(record)

    @router.patch(
        "/{conversation_id}",
        summary="Rename a conversation; its questions never replace the name",
        responses={404: {"description": "No such conversation"}},
    )
    async def rename_conversation(
        conversation_id: str,
        body: api.Rename,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> api.ConversationSummary:
        renamed = None
        if ID_PATTERN.fullmatch(conversation_id):
            renamed = await conversations.rename(conversation_id, caller.user, body.title)
        if renamed is None:
            raise not_found(conversation_id)
        return summary_of(renamed)

    @router.delete(
        "/{conversation_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        summary="Delete a conversation; its sockets are closed (1008)",
    )
    async def delete_conversation(
        conversation_id: str,
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> Response:
        if not ID_PATTERN.fullmatch(conversation_id) or not await conversations.delete(
            conversation_id, caller.user
        ):
            raise not_found(conversation_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router


def build_assistants_route(assistants: Assistants, access: Access) -> APIRouter:
    """`GET /api/assistants`: the chains a conversation can be opened with."""
    router = APIRouter(prefix="/api/assistants", tags=["conversations"])
    listing = api.AssistantList(
        assistants=[
            api.AssistantInfo(
                name=assistant.name,
                description=assistant.description,
                default=assistant is assistants.default,
            )
            for assistant in assistants
        ]
    )

    @router.get("", summary="The assistants a conversation can be opened with")
    async def list_assistants(
        caller: Principal = Depends(access.caller),  # noqa: B008
    ) -> api.AssistantList:
        return listing

    return router
