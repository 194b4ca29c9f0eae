"""The REST view of stored conversations: `/api/conversations`."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.frames import Step, Usage

MessageStatus = Literal["completed", "interrupted", "error", "streaming"]


ASSISTANT = Field(
    default=None,
    description="The assistant (chain) that answers it, as `GET /api/assistants` lists them; "
    "null: the server's default.",
)


class ConversationSummary(BaseModel):
    """One entry of the conversation list."""

    id: str
    title: str = Field(
        description="The name its owner gave it, or else its first question, on one line, "
        "shortened."
    )
    created: datetime
    updated: datetime
    messages: int = Field(description="Questions and replies, counted separately.")
    assistant: str | None = ASSISTANT


class ConversationPage(BaseModel):
    """A page of conversations, most recently updated first."""

    conversations: list[ConversationSummary]
    next_offset: int | None = Field(
        description="The `offset` of the next page; null on the last page."
    )


MAX_TITLE = 200


class Rename(BaseModel):
    """`PATCH /api/conversations/{id}`: a new title, kept from then on."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(
        description=f"1 to {MAX_TITLE} characters once leading and trailing spaces are cut; "
        "one line."
    )

    @field_validator("title")
    @classmethod
    def one_line(cls, title: str) -> str:
        title = title.strip()
        if not title:
            raise ValueError("The title is empty.")
        if len(title) > MAX_TITLE:
            raise ValueError(f"The title is longer than {MAX_TITLE} characters.")
        if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in title):
            raise ValueError("The title must be one line, without control characters.")
        return title


class Message(BaseModel):
    """A question (`user`) or a reply (`assistant`)."""

    role: Literal["user", "assistant"]
    text: str
    time: datetime
    status: MessageStatus | None = Field(
        default=None,
        description="Replies only: how the reply ended, or `streaming` while it is written.",
    )
    usage: Usage | None = Field(
        default=None, description="Replies only, once ended: the model tokens the reply took."
    )
    steps: list[Step] | None = Field(
        default=None,
        description="Replies of an assistant whose chain has steps (tool calls, retrievals, "
        "graph nodes): each step once, as it stands (`started` if it had not ended).",
    )


class Conversation(BaseModel):
    """A conversation with all its messages."""

    id: str
    title: str
    created: datetime
    updated: datetime
    assistant: str | None = ASSISTANT
    messages: list[Message]


class AssistantInfo(BaseModel):
    """One assistant the server offers: a chain a conversation can be opened with."""

    name: str = Field(
        description="What `?assistant=` (or the `/api/chat` body's `assistant`) takes."
    )
    description: str
    default: bool = Field(description="Whether it answers conversations that name none.")


class AssistantList(BaseModel):
    """Every assistant the server offers."""

    assistants: list[AssistantInfo]
