"""The LCEL chain: prompt (system, history, question) piped into a streaming `ChatOpenAI`.

The prompt's shape is said here only: replies run the chain and count the context it takes
through `ChatChain`, so a change to the template reaches both.
"""

from __future__ import annotations

from typing import Any

import openai
from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from backend.config.settings import Settings
from backend.model.upstream import Upstream
from backend.speedups import usable
from backend.speedups.fast_stream import DictChunkCompletions

# Local OpenAI-compatible servers ignore the key, but the client insists on having one.
PLACEHOLDER_KEY = "not-needed"


def build_model(
    settings: Settings, upstream: Upstream, http_client: openai.DefaultAsyncHttpxClient
) -> ChatOpenAI:
    """A `ChatOpenAI` pointed at the configured upstream, streaming, with bounded waits.

    The HTTP client is the app's own (not LangChain's process-wide cached one), so its
    connections live and die with the app's event loop.
    """
    key = settings.openai_api_key or SecretStr(PLACEHOLDER_KEY)
    reply_tokens = upstream.reply_tokens
    model = ChatOpenAI(
        model=upstream.model,
        temperature=settings.temperature,
        api_key=key,
        base_url=upstream.url,
        max_tokens=reply_tokens,
        # ChatOpenAI sends the limit as `max_completion_tokens`, which llama.cpp's server (and
        # other OpenAI-compatible servers) ignore: they read `max_tokens`.
        extra_body={"max_tokens": reply_tokens}
        if reply_tokens and upstream.mode != "openai"
        else None,
        streaming=True,
        # Asks for the usage chunk at the end of the stream (`stream_options.include_usage`):
        # the tokens a reply took, as the model server counts them (see backend/model/usage.py).
        stream_usage=True,
        # Retrying is ours to decide (once, and only before the first token): see reply.py.
        max_retries=0,
        # Covers connecting and every wait for the next bytes of a reply.
        timeout=settings.chat_timeout,
        # Off: on Python 3.11 its per-chunk `asyncio.wait_for` can swallow the cancellation
        # that stops a reply when a chunk lands at the same instant, and the model runs on.
        stream_chunk_timeout=None,
        http_async_client=http_client,
    )
    if usable("fast_stream", settings.chat_speedups):
        model.async_client = DictChunkCompletions(model.async_client)
    return model


class ChatChain:
    """The prompt piped into the model: what every reply runs."""

    def __init__(self, prompt: ChatPromptTemplate, model: ChatOpenAI) -> None:
        self.prompt = prompt
        self.runnable: Runnable[dict[str, Any], BaseMessage] = prompt | model

    def messages(self, history: list[BaseMessage], question: str) -> list[BaseMessage]:
        """The messages the model is sent for `question` after `history`."""
        return self.prompt.format_messages(history=history, question=question)

    async def ainvoke(
        self, history: list[BaseMessage], question: str, config: RunnableConfig
    ) -> BaseMessage:
        """Ask `question` after `history`; the reply streams through `config`'s callbacks."""
        return await self.runnable.ainvoke({"history": history, "question": question}, config)


def build_prompt(settings: Settings) -> ChatPromptTemplate:
    """System prompt, the earlier turns, then the question."""
    return ChatPromptTemplate.from_messages(
        [
            ("system", "{system_prompt}"),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    ).partial(system_prompt=settings.chat_system_prompt)


def build_chain(
    settings: Settings, upstream: Upstream, http_client: openai.DefaultAsyncHttpxClient
) -> ChatChain:
    """The chain every reply runs, pointed at `upstream`."""
    return ChatChain(build_prompt(settings), build_model(settings, upstream, http_client))
