"""One conversation's earlier turns, trimmed oldest-first to a token budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, trim_messages
from langchain_core.messages.utils import count_tokens_approximately

TokenCounter = Callable[[Sequence[BaseMessage]], int]


@dataclass(frozen=True)
class ContextWindow:
    """A model's context size and how it counts tokens."""

    tokens: int
    count: TokenCounter


class History:
    """The messages sent before each new question; never larger than `max_tokens`."""

    def __init__(self, max_tokens: int, token_counter: TokenCounter | None = None) -> None:
        self.max_tokens = max_tokens
        self._count = token_counter or count_tokens_approximately
        self._messages: list[BaseMessage] = []

    @classmethod
    def of(
        cls,
        turns: Iterable[tuple[str, str] | tuple[str, str, Sequence[BaseMessage]]],
        max_tokens: int,
        token_counter: TokenCounter | None = None,
    ) -> History:
        """The history of `turns`, oldest first, fitted once: (question, answer) pairs, or
        triples with the tool calls and results that came between the two, in order. A turn is
        kept or dropped whole, so a tool call is never sent without its result."""
        history = cls(max_tokens, token_counter)
        for turn in turns:
            tools = turn[2] if len(turn) == 3 else ()
            history._messages += [HumanMessage(turn[0]), *tools, AIMessage(turn[1])]
        history._messages = history.fit(max_tokens, history._count)
        return history

    @property
    def messages(self) -> list[BaseMessage]:
        """A copy, so a reply in flight is not affected by later changes."""
        return list(self._messages)

    def fit(self, max_tokens: int, count: TokenCounter) -> list[BaseMessage]:
        """The newest whole turns that fit in `max_tokens` as `count` counts them."""
        if max_tokens <= 0:
            return []
        return trim_messages(
            self._messages,
            max_tokens=max_tokens,
            token_counter=count,
            strategy="last",
            start_on="human",
            allow_partial=False,
        )
