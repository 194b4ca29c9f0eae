"""The chains replies run: the built-in one, and any LangChain runnable of the user's.

The built-in chain is the prompt (system, history, question) piped into a streaming
`ChatOpenAI`; its shape is said here only, since replies run the chain and count the context
it takes through `ChatChain`, so a change to the template reaches both. A user's runnable
(an LCEL chain, a `create_agent` agent, a compiled LangGraph graph) is invoked with
`{"messages": [...]}`, the conversation as LangChain messages, and its system prompt is its
own business (see `RunnableChain`).
"""

from __future__ import annotations

from typing import Any, Protocol

import openai
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
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


class Chain(Protocol):
    """What a reply runs: the messages it sends for a question, and the run itself."""

    # Whether it is the server's own (a failure inside it is the server's, not the user's).
    built_in: bool

    def messages(self, history: list[BaseMessage], question: str) -> list[BaseMessage]:
        """The messages the chain is given (or, the built-in one, the model is sent)."""

    async def ainvoke(
        self, history: list[BaseMessage], question: str, config: RunnableConfig
    ) -> BaseMessage:
        """Answer `question` after `history`; the reply streams through `config`'s callbacks."""


class ChatChain:
    """The prompt piped into the model: the built-in chain."""

    built_in = True

    def __init__(self, prompt: ChatPromptTemplate, model: ChatOpenAI) -> None:
        self.prompt = prompt
        self.model = model
        self.runnable: Runnable[dict[str, Any], BaseMessage] = prompt | model

    def messages(self, history: list[BaseMessage], question: str) -> list[BaseMessage]:
        """The messages the model is sent for `question` after `history`."""
        return self.prompt.format_messages(history=history, question=question)

    async def ainvoke(
        self, history: list[BaseMessage], question: str, config: RunnableConfig
    ) -> BaseMessage:
        """Ask `question` after `history`; the reply streams through `config`'s callbacks."""
        return await self.runnable.ainvoke({"history": history, "question": question}, config)


class RunnableChain:
    """A user's runnable, given the conversation as `{"messages": [...]}`: the history, then
    the question. What it returns is the reply: a message, a state whose `messages` end with
    it (LangGraph's message state, `create_agent`), or text."""

    built_in = False

    def __init__(self, runnable: Runnable[Any, Any]) -> None:
        self.runnable = runnable

    def messages(self, history: list[BaseMessage], question: str) -> list[BaseMessage]:
        return [*history, HumanMessage(question)]

    async def ainvoke(
        self, history: list[BaseMessage], question: str, config: RunnableConfig
    ) -> BaseMessage:
        result = await self.runnable.ainvoke({"messages": self.messages(history, question)}, config)
        return reply_of(result)


def reply_of(result: object) -> BaseMessage:
    """The reply in what a runnable returned: a message, the last message of a state, or text."""
    if isinstance(result, BaseMessage):
        return result
    if isinstance(result, dict):
        messages = result.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], BaseMessage):
            return messages[-1]
    if isinstance(result, str):
        return AIMessage(result)
    raise TypeError(
        f"the chain returned {type(result).__name__}; expected a message, a state with "
        "`messages`, or text"
    )


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
    """The built-in chain, pointed at `upstream`."""
    return ChatChain(build_prompt(settings), build_model(settings, upstream, http_client))
