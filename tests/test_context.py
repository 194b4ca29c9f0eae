"""Fitting a conversation into the model's context counts exactly what the chain sends."""

from __future__ import annotations

from collections.abc import Sequence

import openai
from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

from backend.model.assistants import Assistants
from backend.model.chain import ChatChain, build_model
from backend.model.history import ContextWindow, History
from backend.model.reply import Replier
from backend.model.turn import Turn
from backend.model.upstream import remote_upstream
from backend.observe.metrics import Metrics
from schemas import ChatResponse
from tests.harness import SettingsFactory


class Recorder:
    """A sink that keeps every frame."""

    def __init__(self) -> None:
        self.frames: list[ChatResponse] = []

    def send(self, frame: ChatResponse) -> None:
        self.frames.append(frame)

    def token(self, text: str) -> None:
        self.frames.append(ChatResponse.tokens(text))


def characters(messages: Sequence[BaseMessage]) -> int:
    """A token counter that counts characters, so the test can predict it."""
    return sum(len(str(m.content)) for m in messages)


async def test_question_too_long_counts_the_chains_own_prompt(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(chat_system_prompt="S" * 40, chat_max_reply_tokens=10)
    upstream = remote_upstream(settings)
    upstream.context = ContextWindow(tokens=100, count=characters)
    # A template with more than system + question: the budget must see its extra message.
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "{system_prompt}"),
            ("system", "R" * 30),
            MessagesPlaceholder("history"),
            ("human", "{question}"),
        ]
    ).partial(system_prompt=settings.chat_system_prompt)
    async with openai.DefaultAsyncHttpxClient(timeout=5) as client:
        chain = ChatChain(prompt, build_model(settings, upstream, client))
        sink = Recorder()
        status = await Replier(settings, Assistants.only(chain), upstream, Metrics()).answer(
            Turn("Q" * 25, sink), History(100)
        )
    assert status == "error"
    error = next(frame for frame in sink.frames if frame.type == "error")
    assert error.code == "bad_request"
    assert "it takes 95 tokens" in error.message  # 40 + 30 + 25
