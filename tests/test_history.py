"""History trimming: oldest turns go first, whole turns only, within the budget."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.messages.utils import count_tokens_approximately

from backend.model.history import History


def test_turns_are_kept_in_order() -> None:
    history = History.of([("q1", "a1"), ("q2", "a2")], max_tokens=1000)
    assert history.messages == [
        HumanMessage("q1"),
        AIMessage("a1"),
        HumanMessage("q2"),
        AIMessage("a2"),
    ]


def test_oldest_turns_are_dropped_to_fit_the_budget() -> None:
    turns = [(f"question {n} " + "x" * 100, f"answer {n} " + "y" * 100) for n in range(100)]
    messages = History.of(turns, max_tokens=200).messages
    assert count_tokens_approximately(messages) <= 200
    assert isinstance(messages[0], HumanMessage)
    assert len(messages) % 2 == 0
    assert str(messages[-1].content).startswith("answer 99 ")
    assert len(messages) >= 2


def test_the_budget_is_counted_by_the_counter_given() -> None:
    # One "token" per message: a budget of 4 keeps the last two whole turns.
    def per_message(messages: Sequence[BaseMessage]) -> int:
        return len(messages)

    turns = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    history = History.of(turns, max_tokens=4, token_counter=per_message)
    assert [m.content for m in history.messages] == ["q2", "a2", "q3", "a3"]
    assert History.of(turns, max_tokens=3, token_counter=per_message).messages == [
        HumanMessage("q3"),
        AIMessage("a3"),
    ]


def test_no_budget_sends_no_history() -> None:
    assert History.of([("q", "a")], max_tokens=0).messages == []


def test_messages_are_a_copy() -> None:
    history = History.of([("q", "a")], max_tokens=100)
    history.messages.append(HumanMessage("not kept"))
    assert len(history.messages) == 2
