"""One conversation's earlier turns, trimmed oldest-first to a token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, trim_messages
from langchain_core.messages.utils import count_tokens_approximately

TokenCounter = Callable[[Sequence[BaseMessage]], int]


class History:
    """The messages sent before each new question; never larger than `max_tokens`."""

    def __init__(self, max_tokens: int, token_counter: TokenCounter | None = None) -> None:
        self.max_tokens = max_tokens
        self._count = token_counter or count_tokens_approximately
        self._messages: list[BaseMessage] = []

    @property
    def messages(self) -> list[BaseMessage]:
        """A copy, so a reply in flight is not affected by later changes."""
        return list(self._messages)

    def add_turn(self, question: str, answer: str) -> None:
        """Record a question and the answer the user saw, then drop the oldest turns over budget."""
        self._messages += [HumanMessage(question), AIMessage(answer)]
        self._messages = trim_messages(
            self._messages,
            max_tokens=self.max_tokens,
            token_counter=self._count,
            strategy="last",
            start_on="human",
            allow_partial=False,
        )

    def clear(self) -> None:
        """Forget every turn."""
        self._messages = []

    def __len__(self) -> int:
        return len(self._messages)
