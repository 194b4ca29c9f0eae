"""The REST view of stored conversations: `/api/conversations`."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from schemas.frames import Usage

MessageStatus = Literal["completed", "interrupted", "error", "streaming"]


class ConversationSummary(BaseModel):
    """One entry of the conversation list."""

    id: str
    title: str = Field(description="The conversation's first question, on one line, shortened.")
    created: datetime
    updated: datetime
    messages: int = Field(description="Questions and replies, counted separately.")


class ConversationPage(BaseModel):
    """A page of conversations, most recently updated first."""

    conversations: list[ConversationSummary]
    next_offset: int | None = Field(
        description="The `offset` of the next page; null on the last page."
    )


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


class Conversation(BaseModel):
    """A conversation with all its messages."""

    id: str
    title: str
    created: datetime
    updated: datetime
    messages: list[Message]
