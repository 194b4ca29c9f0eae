"""The chain the chain benchmark serves, the same object behind every server it measures."""

from __future__ import annotations

import os
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI

SYSTEM = "You answer benchmark questions."


def lcel(model: BaseChatModel) -> Runnable[Any, Any]:
    """A custom LCEL chain: a system prompt of its own, the conversation, the model."""
    prompt = ChatPromptTemplate.from_messages([("system", SYSTEM), ("placeholder", "{messages}")])
    return prompt | model


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
    add_routes(app, lcel(model_for(os.environ["BENCH_UPSTREAM"])), path="/lcel")
    return app
