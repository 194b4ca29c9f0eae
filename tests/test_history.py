"""History trimming: oldest turns go first, whole turns only, within the budget."""

from __future__ import annotations

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.messages.utils import count_tokens_approximately

from backend.history import History


def test_turns_are_kept_in_order() -> None:
    history = History(max_tokens=1000)
    history.add_turn("q1", "a1")
    history.add_turn("q2", "a2")
    assert history.messages == [
        HumanMessage("q1"),
        AIMessage("a1"),
        HumanMessage("q2"),
        AIMessage("a2"),
    ]


def test_oldest_turns_are_dropped_to_fit_the_budget() -> None:
    history = History(max_tokens=200)
    for n in range(100):
        history.add_turn(f"question {n} " + "x" * 100, f"answer {n} " + "y" * 100)
    messages = history.messages
    assert count_tokens_approximately(messages) <= 200
    assert isinstance(messages[0], HumanMessage)
    assert len(messages) % 2 == 0
    assert str(messages[-1].content).startswith("answer 99 ")
    assert len(messages) >= 2


def test_clear_forgets_everything() -> None:
    history = History(max_tokens=100)
    history.add_turn("q", "a")
    history.clear()
    assert len(history) == 0
