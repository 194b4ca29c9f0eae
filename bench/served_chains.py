"""The chain the chain benchmark serves, the same object behind every server it measures."""

from __future__ import annotations

import os
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

SYSTEM = "You answer benchmark questions."


def lcel(model: BaseChatModel) -> Runnable[Any, Any]:
    """A custom LCEL chain: a system prompt of its own, the conversation, the model."""
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("placeholder", "{messages}")])
    return prompt | model


@tool
def lookup(query: str) -> str:
    """Look up a fact for the question."""
    return f"one fact about {query}"


def agent(model: BaseChatModel) -> Runnable[Any, Any]:
    """A two-step agent (`create_agent`): the model calls `lookup`, then answers from its result."""
    return create_agent(model, tools=[lookup], system_prompt=SYSTEM)


def model_for(upstream: str) -> ChatOpenAI:
    """A streaming `ChatOpenAI` on the fake model, for servers that are not given one."""
    return ChatOpenAI(
        model="fake-model",
        base_url=upstream,
        api_key="not-needed",
        streaming=True,
        max_retries=0,
    )


def langserve_app() -> Any:
    """The same chain behind LangServe (`add_routes`), for `uvicorn --factory`."""
    from fastapi import FastAPI
    from langserve import add_routes

    app = FastAPI()
    model = model_for(os.environ["BENCH_UPSTREAM"])
    add_routes(app, lcel(model), path="/lcel")
    add_routes(app, agent(model), path="/agent")
    return app
