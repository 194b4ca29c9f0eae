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
from langchain_core.outputs import ChatGeneration, LLMResult

from backend.store.records import carryable
from schemas import Usage

# The tag of a model run whose tokens are not the reply (LangGraph's convention): a step
# that rewrites the question, or routes it, stays silent.
NOSTREAM = "nostream"


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
    """Hands every new token of every chat model in the chain to `on_token` (the chat-langchain
    streaming handler, unbuffered), but for runs tagged `nostream`; and adds up the usage the
    model server reports for each model call."""

    raise_error = True
    run_inline = True

    def __init__(self, on_token: Callable[[str], None]) -> None:
        self.on_token = on_token
        # The tokens of every model call of the reply, as the model server reported them.
        self.usage: Usage | None = None

    async def on_llm_new_token(
        self,
        token: str | list[str | dict[str, Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if tags and NOSTREAM in tags:
            return
        text = token_text(token)
        if text:
            self.on_token(text)

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        for generations in response.generations:
            for generation in generations:
                if not isinstance(generation, ChatGeneration):
                    continue
                metadata = getattr(generation.message, "usage_metadata", None)
                if not metadata:
                    continue
                before = self.usage or Usage(prompt_tokens=0, completion_tokens=0)
                self.usage = Usage(
                    prompt_tokens=before.prompt_tokens + metadata.get("input_tokens", 0),
                    completion_tokens=before.completion_tokens + metadata.get("output_tokens", 0),
                )


class ToolWatch(AsyncCallbackHandler):
    """Remembers the tool runs of a reply that failed, so a failure of the chain that comes
    from one is reported as the tool's."""

    raise_error = True
    run_inline = True
    ignore_llm = True
    ignore_chain = True
    ignore_retriever = True
    ignore_chat_model = True

    def __init__(self) -> None:
        self._names: dict[UUID, str] = {}
        self.failures: list[tuple[str, BaseException]] = []

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._names[run_id] = str(serialized.get("name") or kwargs.get("name") or "tool")

    async def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.failures.append((self._names.get(run_id, "tool"), error))

    def failed_tool(self, exc: BaseException) -> tuple[str, BaseException] | None:
        """The tool whose failure `exc` is (or was caused by), if any."""
        seen: BaseException | None = exc
        while seen is not None:
            for name, error in self.failures:
                if error is seen:
                    return name, error
            seen = seen.__cause__ or seen.__context__
        return None


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
