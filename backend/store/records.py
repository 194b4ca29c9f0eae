"""What a conversation is made of, live or stored, and how it is replayed as frames.

Sequence numbers: every frame of a conversation takes the next `seq`, except reply text, which
advances it by its length in characters. A turn therefore only needs the `seq` just before its
first character (`text_base`) to say exactly which part of its text any `seq` ends at, so a
client that resumes `after` some `seq` gets the rest of the text, to the character, whether the
turn is still streaming or was stored long ago.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from schemas import ChatResponse, EndStatus, Usage

TITLE_CHARS = 80
# What no text can carry: a lone UTF-16 surrogate (JSON's "\ud800" escapes one; it has no
# UTF-8 form, so no frame, request or row holding it can be written) and NUL (which
# PostgreSQL's text cannot hold).
UNSENDABLE = re.compile("[\x00\ud800-\udfff]")


def carryable(text: str) -> str:
    """`text` with each character no text can carry replaced by U+FFFD: as long as it was, so
    every `seq` counted in characters still holds."""
    return UNSENDABLE.sub("\ufffd", text) if UNSENDABLE.search(text) else text


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def title_for(question: str) -> str:
    """A conversation's title: its first question, on one line, cut to `TITLE_CHARS`."""
    line = " ".join(question.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass
class TurnRecord:
    """A question and its reply: the frames the reply sent, other than its text, and the text.

    `events` are the bot's `start`, `info`, `error` and `end` frames with their `seq`; `parts`
    is the reply text as it arrived (a live turn appends to it as tokens come). `status` stays
    None while the reply streams.
    """

    position: int
    question: str
    echo_seq: int
    asked_at: datetime = field(default_factory=now)
    events: list[ChatResponse] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    text_base: int | None = None
    status: EndStatus | None = None
    # The tool calls the reply's model made and their results, in order, as LangChain message
    # dicts (`messages_to_dict`): complete calls only, sent back as history with the turn.
    exchanged: list[dict[str, Any]] = field(default_factory=list)
    # The webhook endpoint the question asked to be called when the reply ends.
    webhook: str | None = None
    # Asked with no client attached (`POST /api/conversations`): no resume grace stops it.
    background: bool = False
    # For a question that was edited: the `seq` its earlier text was said back with.
    replaces: int | None = None

    @property
    def first_seq(self) -> int:
        """The `seq` of the reply's first frame (its `start`), or of the question said back."""
        return (self.events[0].seq or self.echo_seq) if self.events else self.echo_seq

    @property
    def text(self) -> str:
        """The reply so far."""
        return "".join(self.parts)

    @property
    def last_seq(self) -> int:
        """The highest `seq` of any frame of this turn."""
        last = self.echo_seq
        if self.events:
            last = max(last, self.events[-1].seq or 0)
        if self.text_base is not None:
            last = max(last, self.text_base + sum(map(len, self.parts)))
        return last

    @property
    def usage(self) -> Usage | None:
        """The model tokens the reply took, as its `end` frame says; None before it ends."""
        if self.events and self.events[-1].type == "end":
            return self.events[-1].usage
        return None

    def restart(self) -> None:
        """Forget the reply, keeping the question: the turn is about to be answered again."""
        self.events = []
        self.parts = []
        self.exchanged = []
        self.text_base = None
        self.status = None

    def frames_after(self, after: int) -> Iterator[ChatResponse]:
        """This turn's frames with `seq` above `after`, in order; the text as one frame."""
        if self.echo_seq > after:
            yield ChatResponse.echo(self.question, seq=self.echo_seq, replaces=self.replaces)
        text_pending = self.text_base is not None
        for event in self.events:
            if text_pending and (event.seq or 0) > (self.text_base or 0):
                yield from self._text_after(after)
                text_pending = False
            if (event.seq or 0) > after:
                yield event
        if text_pending:
            yield from self._text_after(after)

    def _text_after(self, after: int) -> Iterator[ChatResponse]:
        if self.text_base is None:
            return
        text = self.text
        end = self.text_base + len(text)
        if end > after:
            yield ChatResponse.tokens(text[max(0, after - self.text_base) :], seq=end)


@dataclass
class ConversationRecord:
    """A conversation as stored: its title, times, the last `seq` used and its turns.

    When saving, `turns` holds only the turns that changed; when loading, all of them.
    """

    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    last_seq: int
    turn_count: int
    turns: list[TurnRecord] = field(default_factory=list)
    owner: str = ""
    # The assistant that answers it (see backend/model/assistants.py); None: the default.
    assistant: str | None = None
    # Webhook events to store with it, in the same transaction (see `DeliveryRecord`).
    deliveries: list[DeliveryRecord] = field(default_factory=list)


@dataclass(frozen=True)
class DeliveryRecord:
    """A webhook event for one endpoint, to be delivered. Its id is made from what it tells
    of (the reply or the deletion, and the endpoint), so storing it twice stores it once."""

    id: str
    endpoint: str
    event: str
    conversation_id: str
    owner: str
    payload: str
    created_at: datetime


@dataclass(frozen=True)
class Found:
    """A turn of a stored conversation that holds what a search asked for."""

    conversation_id: str
    title: str
    question: str
    answer: str
    asked_at: datetime


@dataclass(frozen=True)
class ConversationSummary:
    """One entry of the conversation list."""

    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    turn_count: int
    assistant: str | None = None
