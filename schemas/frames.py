"""The wire protocol of `/chat`: the frames the server sends and the messages it reads."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

Sender = Literal["bot", "you"]
FrameType = Literal["start", "stream", "end", "error", "info"]
EndStatus = Literal["completed", "interrupted", "error"]
ErrorCode = Literal[
    "bad_request",
    "not_configured",
    "upstream_auth",
    "upstream_rate_limited",
    "upstream_unavailable",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_dropped",
    "upstream_rejected",
    "shutting_down",
    "unavailable",
    "unauthorized",
    "rate_limited",
    "chain_error",
    "tool_error",
    "internal",
]


StepKind = Literal["tool", "retriever", "chain"]
StepStatus = Literal["started", "completed", "error", "interrupted"]


class StepDocument(BaseModel):
    """A document a retriever found, as its metadata names it."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = None
    source: str | None = None


class StepDetail(BaseModel):
    """What there is to say of a step; each kind fills its own fields."""

    model_config = ConfigDict(extra="forbid")

    arguments: Any = Field(default=None, description="A tool's arguments, on its `started` frame.")
    result: str | None = Field(
        default=None, description="A tool's result as text, shortened, on its `completed` frame."
    )
    query: str | None = Field(default=None, description="What a retriever was asked.")
    documents: list[StepDocument] | None = Field(
        default=None, description="What a retriever found, on its `completed` frame."
    )
    duration_ms: float | None = Field(
        default=None, ge=0, description="How long the step took, when it has ended."
    )
    error: str | None = Field(
        default=None, description="What the step raised, on its `error` frame."
    )


class Step(BaseModel):
    """A step of an assistant's chain: a tool call, a retrieval, a named sub-chain or graph
    node. Each has a `started` frame and then one `completed` or `error` frame, with the same
    `id`."""

    model_config = ConfigDict(extra="forbid")

    kind: StepKind
    name: str
    id: str
    status: StepStatus
    detail: StepDetail | None = None


class Usage(BaseModel):
    """The model tokens one reply took: its prompt (the question and the history sent with
    it) and its completion (the reply)."""

    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    estimated: bool = Field(
        default=False,
        description="True when the model server did not report usage (a stopped reply, or a "
        "server that never does) and the server counted the tokens itself.",
    )


class Timings(BaseModel):
    """How long a reply took, from its start (its `start` frame)."""

    model_config = ConfigDict(extra="forbid")

    first_token_seconds: float | None = Field(
        default=None,
        description="To its first text; absent (null in webhooks) when none came, or for a "
        "reply cut off by a crash.",
    )
    duration_seconds: float | None = Field(
        default=None, description="To its end; absent (null) for a reply cut off by a crash."
    )


class ChatResponse(BaseModel):
    """One frame from server to client."""

    model_config = ConfigDict(extra="forbid")

    sender: Sender
    message: str
    type: FrameType
    status: EndStatus | None = Field(
        default=None, description="Only on `end` frames: how the reply ended."
    )
    code: ErrorCode | None = Field(
        default=None, description="Only on `error` frames: what kind of failure it was."
    )
    seq: int | None = Field(
        default=None,
        ge=0,
        description=(
            "On frames that belong to the conversation: strictly increasing within it, the same "
            "for every socket. Not consecutive: a `stream` frame advances it by the length of "
            "its text. Absent on frames that answer one socket only."
        ),
    )
    conversation: str | None = Field(
        default=None,
        description="On the `info` frame that opens a socket, and on the reset acknowledgement: "
        "the id of the conversation the socket is now in.",
    )
    regenerate: bool | None = Field(
        default=None,
        description="On a `start` frame: this reply replaces the last reply shown, which the "
        "client should remove.",
    )
    usage: Usage | None = Field(
        default=None, description="On `end` frames: the model tokens the reply took."
    )
    timings: Timings | None = Field(
        default=None,
        description="On `end` frames: seconds from the reply's start to its first text and to "
        "its end (tokens per second: `usage.completion_tokens` over the time between them).",
    )
    step: Step | None = Field(
        default=None,
        description="On `info` frames about a step of the assistant's chain (a tool call, a "
        "retrieval, a graph node); `message` says the same in words.",
    )
    replaces: int | None = Field(
        default=None,
        description="On a question said back (`sender: you`): it replaces the question that "
        "was said back with this `seq`, and everything after it (an edit).",
    )
    retry_after: float | None = Field(
        default=None,
        ge=0,
        description="On `rate_limited` errors: seconds until the same request would be allowed; "
        "absent when that depends on another reply ending.",
    )

    @classmethod
    def bot(
        cls,
        type: FrameType,
        message: str = "",
        *,
        status: EndStatus | None = None,
        code: ErrorCode | None = None,
    ) -> ChatResponse:
        """A frame from the bot: `start`, `info`, `error` (with `code`), `end` (with `status`)."""
        return cls(sender="bot", message=message, type=type, status=status, code=code)

    @classmethod
    def tokens(cls, text: str, seq: int | None = None) -> ChatResponse:
        """A piece of the bot's reply: one token, or several merged (with the last one's `seq`)."""
        return cls(sender="bot", message=text, type="stream", seq=seq)

    @classmethod
    def echo(
        cls, question: str, seq: int | None = None, replaces: int | None = None
    ) -> ChatResponse:
        """The user's question, said back before the reply starts (in place of the one said
        back at `replaces`, for an edit)."""
        return cls(sender="you", message=question, type="stream", seq=seq, replaces=replaces)

    def to_json(self) -> str:
        """Serialise without the fields that do not apply to this frame type."""
        return self.model_dump_json(exclude_none=True)


class Question(BaseModel):
    """Ask the bot something; pre-empts a reply in progress."""

    type: Literal["question"]
    message: str


class Stop(BaseModel):
    """Interrupt the reply in progress."""

    type: Literal["stop"]


class Reset(BaseModel):
    """Interrupt the reply in progress, if any, and move this socket to a new conversation."""

    type: Literal["reset"]


class Regenerate(BaseModel):
    """Answer the last question again, replacing the last reply (interrupted if streaming);
    with a `message`, the last question is first replaced by it (an edit)."""

    type: Literal["regenerate"]
    message: str | None = Field(
        default=None,
        description="The last question's new text: it replaces the question and its reply, "
        "in the conversation and in what the model is sent from now on.",
    )


ClientMessage = Annotated[Question | Stop | Reset | Regenerate, Field(discriminator="type")]
CLIENT_MESSAGE: TypeAdapter[Question | Stop | Reset | Regenerate] = TypeAdapter(ClientMessage)
CLIENT_TYPES: tuple[str, ...] = ("question", "stop", "reset", "regenerate")
CHAT_RESPONSE: TypeAdapter[ChatResponse] = TypeAdapter(ChatResponse)
