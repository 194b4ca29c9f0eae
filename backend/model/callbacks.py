"""LangChain callback handlers that turn a model run into frames as it happens.

Both set `raise_error`: LangChain logs and swallows a handler's exception otherwise, and a
handler that fails must end the reply with an error rather than let the model run on unheard.
Both set `run_inline`, so they are awaited in order on the model's own task instead of being
gathered in a new task per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import BaseMessage

from backend.store.records import carryable


def token_text(token: str | list[str | dict[str, Any]]) -> str:
    """The text of a streamed token, which LangChain may hand over as content blocks; what a
    model server sent that no text can carry (see `carryable`) is replaced."""
    if isinstance(token, str):
        return carryable(token)
    parts: list[str] = []
    for block in token:
        if isinstance(block, str):
            parts.append(block)
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
    return carryable("".join(parts))


class StreamingHandler(AsyncCallbackHandler):
    """Hands every new token to `on_token` (the chat-langchain streaming handler, unbuffered)."""

    raise_error = True
    run_inline = True

    def __init__(self, on_token: Callable[[str], None]) -> None:
        self.on_token = on_token

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        text = token_text(token)
        if text:
            self.on_token(text)


class ProgressHandler(AsyncCallbackHandler):
    """Reports the steps of a run that come before its tokens as `info` messages."""

    raise_error = True
    run_inline = True

    def __init__(self, on_info: Callable[[str], None], model: str) -> None:
        self.on_info = on_info
        self.model = model

    @property
    def ignore_llm(self) -> bool:
        # The model's own events (a token, the end) are not ours: skipping them spares the
        # callback manager a call per token. Chat-model starts are still delivered.
        return True

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        sent = sum(len(batch) for batch in messages)
        self.on_info(f"Asking {self.model} ({sent} messages of context)")
