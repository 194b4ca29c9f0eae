"""The turn in progress: a question, where its reply's frames go, and the reply's text so far."""

from __future__ import annotations

import time
from typing import Any, Protocol

from schemas import ChatResponse, Step, Usage


class FrameSink(Protocol):
    """Where a reply's frames go. Neither method raises for a client that is gone: the
    conversation drops that client, and the reply goes on for the others and the store."""

    def send(self, frame: ChatResponse) -> None:
        """Queue one frame."""

    def token(self, text: str) -> None:
        """Queue a piece of the reply's text (a `stream` frame from the bot)."""


class Turn:
    """One question and the reply being written to it.

    Every piece of text reaches the sink and the turn's record together, so what the
    conversation keeps is exactly what the client was sent.
    """

    def __init__(
        self,
        question: str,
        sink: FrameSink,
        parts: list[str] | None = None,
        exchanged: list[dict[str, Any]] | None = None,
    ) -> None:
        self.question = question
        self.sink = sink
        # The tool calls and results the reply's models exchanged (message dicts), kept in a
        # stored turn's own list, like its text.
        self.exchanged: list[dict[str, Any]] = [] if exchanged is None else exchanged
        # The list the text is kept in: a stored turn's own, so that it is never copied.
        self._parts = [] if parts is None else parts
        # The model tokens the reply took, once it has ended (None if the model was not asked).
        self.usage: Usage | None = None
        # `time.perf_counter()` when the first piece of text was sent.
        self.first_token_at: float | None = None

    @property
    def text(self) -> str:
        """The reply so far."""
        return "".join(self._parts)

    @property
    def pieces(self) -> int:
        """How many pieces of text the reply has had so far."""
        return len(self._parts)

    @property
    def streamed(self) -> bool:
        """Whether any of the reply has been sent."""
        return bool(self._parts)

    def token(self, text: str) -> None:
        """Send a piece of the reply and keep it."""
        self.sink.token(text)
        if not self._parts:
            self.first_token_at = time.perf_counter()
        self._parts.append(text)

    def send(self, frame: ChatResponse) -> None:
        """Send a frame about the reply (`start`, `info`, `error`, `end`)."""
        self.sink.send(frame)

    def info(self, text: str) -> None:
        """Tell the client what is happening before or around the reply."""
        self.sink.send(ChatResponse.bot("info", text))

    def step(self, text: str, step: Step) -> None:
        """Tell the client of a step of the chain (a tool call, a retrieval), in words and as
        a `step`."""
        frame = ChatResponse.bot("info", text)
        frame.step = step
        self.sink.send(frame)
