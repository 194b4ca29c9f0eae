"""A tool-using agent: LangChain's `create_agent` with a calculator, the clock, and a search
over the user's own earlier conversations on this server.

`CHAT_CHAIN=examples.agent:agent make run` serves it. The embedded 135M model cannot call
tools reliably: point the server at a model that can (see the README's *Your own chain*).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import tool

SYSTEM = (
    "You are a helpful assistant. Use the tools for arithmetic, for the current time, and to "
    "look up what the user said in earlier conversations."
)
OPERATORS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
}
LONGEST_POWER = 100


def evaluate(node: ast.expr) -> float:
    """An arithmetic expression's value: numbers and + - * / ** % only."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > LONGEST_POWER:
            raise ValueError("that power is too large")
        return float(OPERATORS[type(node.op)](left, right))
    raise ValueError("only numbers and + - * / ** % are allowed")


@tool
def calculator(expression: str) -> str:
    """Work out an arithmetic expression, such as `(2 + 3) * 4`."""
    try:
        return f"{evaluate(ast.parse(expression, mode='eval').body):g}"
    except (SyntaxError, ValueError, ArithmeticError) as exc:  # told to the model, to answer
        return f"Cannot work out {expression!r}: {exc}"


@tool
def current_time() -> str:
    """The current date and time, in UTC."""
    return datetime.now(UTC).strftime("%A %d %B %Y, %H:%M UTC")


@tool
async def search_my_conversations(text: str, config: RunnableConfig) -> str:
    """Find the user's earlier questions and answers that mention `text`."""
    search: Callable[[str], Awaitable[list[Any]]] = config["configurable"]["search_conversations"]
    found = await search(text)
    if not found:
        return f"Nothing in the earlier conversations mentions {text!r}."
    return "\n".join(
        f"- {turn.asked_at:%d %b %Y} in “{turn.title}”: asked {turn.question!r}, "
        f"answered {turn.answer[:200]!r}"
        for turn in found
    )


def agent(model: BaseChatModel) -> Runnable[Any, Any]:
    """Calculates, tells the time, and looks up your earlier conversations, with tools."""
    return create_agent(
        model, tools=[calculator, current_time, search_my_conversations], system_prompt=SYSTEM
    )
