"""Chains of a user's own, served by import string in the tests (`CHAT_CHAIN=tests.chains:...`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.tools import tool

from backend.config.settings import DEFAULT_SYSTEM_PROMPT


def _last_question(state: dict[str, Any]) -> str:
    messages: list[BaseMessage] = state["messages"]
    return str(messages[-1].content)


# No model at all: the reply is what it returns, sent as one piece.
shouting: Runnable[Any, Any] = RunnableLambda(
    lambda state: AIMessage(_last_question(state).upper() + f" ({len(state['messages'])} messages)")
)


def condensed(model: BaseChatModel) -> Runnable[Any, Any]:
    """Rewrites the question silently, then answers the rewritten question."""
    rewrite = model.with_config(tags=["nostream"])

    async def answer(state: dict[str, Any]) -> Any:
        standalone = await rewrite.ainvoke([HumanMessage("Rewrite: " + _last_question(state))])
        return {"messages": [*state["messages"], await model.ainvoke([standalone])]}

    return RunnableLambda(answer)


class IndexMissing(Exception):
    pass


async def _broken(state: dict[str, Any]) -> AIMessage:
    raise IndexMissing("no index was built for these documents")


broken: Runnable[Any, Any] = RunnableLambda(_broken)


@tool
def divide(numerator: float, denominator: float) -> float:
    """Divide two numbers."""
    return numerator / denominator


async def _calculate(state: dict[str, Any]) -> AIMessage:
    result = await divide.ainvoke({"numerator": 1, "denominator": 0})
    return AIMessage(str(result))


calculating: Runnable[Any, Any] = RunnableLambda(_calculate)

not_a_chain = 42


def failing_factory(model: BaseChatModel) -> Runnable[Any, Any]:
    raise RuntimeError("the vector store is not reachable")


class Shelf(BaseRetriever):
    """Two documents on every question."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(
                "Lighthouses guide ships.", metadata={"title": "Lighthouses", "source": "a.md"}
            ),
            Document("Ships carry cargo.", metadata={"source": "b.md"}),
        ]


async def _look_up(state: dict[str, Any]) -> AIMessage:
    documents = await Shelf().ainvoke(_last_question(state))
    quotient = await divide.ainvoke({"numerator": 6, "denominator": 3})
    return AIMessage(f"{len(documents)} documents, {quotient}")


# A retrieval, a tool call, and a sub-chain tagged `step`, before the reply.
stepping: Runnable[Any, Any] = RunnableLambda(_look_up) | RunnableLambda(
    lambda message: message
).with_config(run_name="polish", tags=["step"])


@tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


def agent(model: BaseChatModel) -> Runnable[Any, Any]:
    """Calculates with tools."""
    return create_agent(model, tools=[add, divide])


# Whether the slow tool was cancelled, and when it started: the tests read it.
SLOW_TOOL: dict[str, Any] = {}


@tool
async def wait_for_it(seconds: float) -> str:
    """Wait a while, then say so."""
    SLOW_TOOL.update(started=time.monotonic(), cancelled=False)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        SLOW_TOOL["cancelled"] = True
        raise
    return "waited"


def patient_agent(model: BaseChatModel) -> Runnable[Any, Any]:
    """Waits with a tool."""
    return create_agent(model, tools=[wait_for_it])


def like_built_in(model: BaseChatModel) -> Runnable[Any, Any]:
    """The built-in chain's shape, as a user's chain: the protocol suite runs on it too."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", DEFAULT_SYSTEM_PROMPT), ("placeholder", "{messages}")]
    )
    return prompt | model
