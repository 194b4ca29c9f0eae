"""Background questions and the webhook events that tell of their replies (and of
conversations deleted): the bodies the server takes and sends, and the admin's delivery list."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.frames import EndStatus, ErrorCode, Timings, Usage

WebhookEventType = Literal[
    "reply.completed", "reply.failed", "reply.interrupted", "conversation.deleted"
]
EVENT_TYPES: tuple[WebhookEventType, ...] = (
    "reply.completed",
    "reply.failed",
    "reply.interrupted",
    "conversation.deleted",
)
# The reply event each way a reply can end sends.
REPLY_EVENTS: dict[EndStatus, WebhookEventType] = {
    "completed": "reply.completed",
    "error": "reply.failed",
    "interrupted": "reply.interrupted",
}
DeliveryStatus = Literal["pending", "delivered", "failed"]
WEBHOOK_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class BackgroundQuestion(BaseModel):
    """`POST /api/conversations` and `POST /api/conversations/{id}/messages`: a question
    answered with no client attached."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = Field(
        default=None, description="What to ask; leave it out with `regenerate`."
    )
    regenerate: bool = Field(
        default=False,
        description="Answer the conversation's last question again, in place of its reply "
        "(only on `/messages`).",
    )
    assistant: str | None = Field(
        default=None,
        max_length=64,
        description="The assistant a new conversation is opened with (`GET /api/assistants`).",
    )
    webhook: str | None = Field(
        default=None,
        max_length=64,
        description="A registered endpoint (`CHAT_WEBHOOKS`) to call when the reply ends.",
    )


class Accepted(BaseModel):
    """A background question taken: its reply runs, and can be watched or stopped."""

    conversation: str = Field(description="The conversation's id.")
    seq: int = Field(
        description="The `seq` of the reply's first frame: join with `after=seq-1` to watch "
        "it from its start."
    )
    webhook: str | None = Field(description="The endpoint that will be called, if any.")


class ErrorInfo(BaseModel):
    """Why a reply failed."""

    code: ErrorCode
    message: str


class SeqRange(BaseModel):
    """The `seq` of a reply's first frame (`start`) and of its last (`end`)."""

    first: int
    last: int


class ReplyData(BaseModel):
    """A reply that ended: how, with what text, at what cost."""

    conversation: str
    user: str = Field(description="The conversation's owner ('' when auth is off).")
    assistant: str | None
    turn: int = Field(description="The turn's position in the conversation, from 0.")
    question: str
    seq: SeqRange
    status: EndStatus
    text: str = Field(description="The whole reply (what was streamed before a stop or error).")
    error: ErrorInfo | None
    usage: Usage | None
    timings: Timings


class ReplyEvent(BaseModel):
    """`reply.completed`, `reply.failed` or `reply.interrupted`."""

    type: Literal["reply.completed", "reply.failed", "reply.interrupted"]
    timestamp: datetime = Field(description="When the event happened (not when it is sent).")
    data: ReplyData


class DeletedData(BaseModel):
    """A conversation that was deleted."""

    conversation: str
    user: str


class DeletedEvent(BaseModel):
    """`conversation.deleted`."""

    type: Literal["conversation.deleted"]
    timestamp: datetime
    data: DeletedData


WebhookEvent = Annotated[ReplyEvent | DeletedEvent, Field(discriminator="type")]


class Delivery(BaseModel):
    """One event for one endpoint, and how its delivery stands."""

    id: str = Field(description="The `webhook-id` every attempt carries.")
    endpoint: str
    event: WebhookEventType
    conversation: str
    status: DeliveryStatus
    attempts: int
    created: datetime
    last_attempt: datetime | None
    last_response: int | None = Field(description="The HTTP status of the last answer, if any.")
    last_error: str | None = Field(description="Why the last attempt failed, in a sentence.")
    next_attempt: datetime | None = Field(description="When it is tried next, while pending.")
    delivered: datetime | None


class DeliveryList(BaseModel):
    """`GET /api/webhooks/deliveries`: the most recent first."""

    deliveries: list[Delivery]
