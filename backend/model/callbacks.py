"""LangChain callback handlers that turn a model run into frames as it happens.

Both set `raise_error`: LangChain logs and swallows a handler's exception otherwise, and a
handler that fails must end the reply with an error rather than let the model run on unheard.
Both set `run_inline`, so they are awaited in order on the model's own task instead of being
gathered in a new task per token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from backend.model.history import TokenCounter
from backend.model.usage import counted as count_usage
from backend.store.records import carryable
from schemas import Step, StepDetail, StepDocument, Usage
from schemas.frames import StepKind, StepStatus

# The tag of a model run whose tokens are not the reply (LangGraph's convention): a step
# that rewrites the question, or routes it, stays silent.
NOSTREAM = "nostream"
# The tag of a sub-chain to report as a step (`.with_config(run_name=..., tags=["step"])`).
STEP_TAG = "step"
# How much of a tool's arguments and result, and how many documents' names, a frame carries.
LONGEST_ARGUMENTS = 2000
LONGEST_RESULT = 300
LISTED_DOCUMENTS = 5


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
    streaming handler, unbuffered), but for runs tagged `nostream`."""

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
        if tags and NOSTREAM in tags:
            return
        text = token_text(token)
        if text:
            self.on_token(text)


@dataclass
class ModelCall:
    """One chat model call of a reply: what it was sent, what it wrote, what it was charged."""

    sent: list[BaseMessage]
    # As the model gave them (text, or content blocks): made text only if counted.
    parts: list[str | list[str | dict[str, Any]]] = field(default_factory=list)
    reported: Usage | None = None


class ModelCalls(AsyncCallbackHandler):
    """Every chat model call of a user's chain, silent ones too: the usage of the reply is
    their sum, as each model server reported it, else as counted from what each was sent and
    wrote. Hands each model message that calls tools to `on_exchange`, for the history."""

    raise_error = True
    run_inline = True
    ignore_chain = True
    ignore_retriever = True
    ignore_agent = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(
        self, count: TokenCounter, on_exchange: Callable[[BaseMessage], None] | None = None
    ) -> None:
        self.count = count
        self.on_exchange = on_exchange
        self.calls: dict[UUID, ModelCall] = {}
        self.answered = 0  # calls that ended with an answer

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self.calls[run_id] = ModelCall([message for batch in messages for message in batch])

    async def on_llm_new_token(
        self, token: str | list[str | dict[str, Any]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        call = self.calls.get(run_id)
        if call is not None:
            call.parts.append(token)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.answered += 1
        call = self.calls.get(run_id)
        for generations in response.generations:
            for generation in generations:
                if not isinstance(generation, ChatGeneration):
                    continue
                message = generation.message
                calls = getattr(message, "tool_calls", None)
                if calls and self.on_exchange is not None:
                    self.on_exchange(AIMessage(content=message.content, tool_calls=calls))
                if call is None:
                    continue
                if not call.parts:  # a model that did not stream: its whole text
                    call.parts.append(message.content)
                metadata = getattr(message, "usage_metadata", None)
                if metadata:
                    call.reported = Usage(
                        prompt_tokens=metadata.get("input_tokens", 0),
                        completion_tokens=metadata.get("output_tokens", 0),
                    )

    def usage(self) -> Usage | None:
        """The sum over every call that answered or wrote something (a call cut short counts
        what it wrote; one that failed or was stopped before its first token, nothing, as for
        the built-in chain); None if there was none."""
        calls = [call for call in self.calls.values() if call.parts or call.reported]
        if not calls:
            return None
        prompt = completion = 0
        estimated = False
        for call in calls:
            if call.reported is not None:
                prompt += call.reported.prompt_tokens
                completion += call.reported.completion_tokens
                continue
            estimated = True
            text = "".join(token_text(part) for part in call.parts)
            counted = count_usage(call.sent, text, self.count)
            prompt += counted.prompt_tokens
            completion += counted.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=estimated)


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
        if tags and NOSTREAM in tags:  # a silent step says nothing
            return
        sent = sum(len(batch) for batch in messages)
        plural = "s" if sent != 1 else ""
        self.on_info(f"Asking {self.model} ({sent} message{plural} of context)")


STOPPED = "Stopped before it finished."


class StepHandler(AsyncCallbackHandler):
    """Reports the steps of a user's chain as `info` frames with a `step`: each tool call,
    retrieval, LangGraph node, and sub-chain tagged `step`, once as it starts and once as it
    ends. Remembers the tool runs that failed, so a failure of the chain that comes from one is
    reported as the tool's. Never sees a token: it costs nothing per token."""

    raise_error = True
    run_inline = True
    ignore_llm = True
    ignore_chat_model = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(
        self,
        on_step: Callable[[str, Step], None],
        on_exchange: Callable[[BaseMessage], None] | None = None,
    ) -> None:
        self.on_step = on_step
        # Given each tool result that answers a model's tool call, as the tool ends.
        self.on_exchange = on_exchange
        # Steps under way: kind, name and when each started.
        self._open: dict[UUID, tuple[StepKind, str, float]] = {}
        # Chain runs tagged `step`: their children inherit the tag, but are not steps.
        self._tagged: set[UUID] = set()
        self.taken = 0  # tool calls and searches begun
        self.failures: list[tuple[str, BaseException]] = []

    # Tools.

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
        name = str((serialized or {}).get("name") or kwargs.get("name") or "tool")
        arguments: Any = inputs if inputs is not None else input_str
        said = json.dumps(arguments, ensure_ascii=False, default=str)
        if len(said) > LONGEST_ARGUMENTS:
            arguments = said = shortened(said, LONGEST_ARGUMENTS)
        self._begin("tool", name, run_id, f"Calling {name} with {said}", arguments=arguments)

    async def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if isinstance(output, ToolMessage) and self.on_exchange is not None:
            self.on_exchange(output)
        content = getattr(output, "content", output)
        result = shortened(content if isinstance(content, str) else str(content), LONGEST_RESULT)
        self._end(run_id, lambda name: f"{name} returned {result}", result=result)

    async def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        opened = self._open.get(run_id)
        self.failures.append((opened[1] if opened else "tool", error))
        self._failed(run_id, error)

    def failed_tool(self, exc: BaseException) -> tuple[str, BaseException] | None:
        """The tool whose failure `exc` is (or was caused by), if any."""
        seen: BaseException | None = exc
        while seen is not None:
            for name, error in self.failures:
                if error is seen:
                    return name, error
            seen = seen.__cause__ or seen.__context__
        return None

    # Retrievers.

    async def on_retriever_start(
        self,
        serialized: dict[str, Any],
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = str(kwargs.get("name") or (serialized or {}).get("name") or "retriever")
        self._begin("retriever", name, run_id, f"Searching for {query!r}", query=query)

    async def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        found = [
            StepDocument(
                title=_text_or_none(document.metadata.get("title")),
                source=_text_or_none(document.metadata.get("source")),
            )
            for document in documents
        ]
        names = [document.title or document.source for document in found]
        listed = ", ".join(name for name in names[:LISTED_DOCUMENTS] if name)
        said = f"Found {len(found)} document{'s' if len(found) != 1 else ''}"
        self._end(run_id, lambda _: f"{said}: {listed}" if listed else said, documents=found)

    async def on_retriever_error(
        self, error: BaseException, *, run_id: UUID, **kwargs: Any
    ) -> None:
        self._failed(run_id, error)

    # Graph nodes and sub-chains tagged `step`.

    async def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name")
        if not isinstance(name, str):
            return
        node = (metadata or {}).get("langgraph_node") == name
        tagged = STEP_TAG in (tags or ())
        if tagged:
            self._tagged.add(run_id)
        if node or (tagged and parent_run_id not in self._tagged):
            self._begin("chain", name, run_id, f"Running {name}")

    async def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._tagged.discard(run_id)
        if run_id in self._open:
            self._end(run_id, lambda name: f"{name} done")

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._tagged.discard(run_id)
        self._failed(run_id, error)

    # Frames.

    def _begin(self, kind: StepKind, name: str, run_id: UUID, said: str, **detail: Any) -> None:
        if kind != "chain":  # a graph node around a model call has done nothing yet
            self.taken += 1
        self._open[run_id] = (kind, name, time.perf_counter())
        step = Step(kind=kind, name=name, id=str(run_id), status="started")
        if detail:
            step.detail = StepDetail(**detail)
        self.on_step(said, step)

    def _end(self, run_id: UUID, said: Callable[[str], str], **detail: Any) -> None:
        self._close(run_id, "completed", lambda name, took: f"{said(name)} ({took:g} ms)", detail)

    def interrupted(self) -> None:
        """The reply is being stopped: every step still under way ends `interrupted`, the
        innermost first."""
        for run_id in reversed(list(self._open)):
            self._stopped(run_id)

    def _stopped(self, run_id: UUID) -> None:
        said = "{} stopped ({:g} ms)".format
        self._close(run_id, "interrupted", said, {"error": STOPPED})

    def _failed(self, run_id: UUID, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):  # the reply is being stopped
            self._stopped(run_id)
            return
        raised = quoted(error)
        self._close(run_id, "error", lambda name, _: f"{name} failed: {raised}", {"error": raised})

    def _close(
        self,
        run_id: UUID,
        status: StepStatus,
        said: Callable[[str, float], str],
        detail: dict[str, Any],
    ) -> None:
        """The second frame of a step under way: how it ended, and how long it took."""
        opened = self._open.pop(run_id, None)
        if opened is None:
            return
        kind, name, began = opened
        took = round((time.perf_counter() - began) * 1000, 1)
        step = Step(kind=kind, name=name, id=str(run_id), status=status)
        step.detail = StepDetail(duration_ms=took, **detail)
        self.on_step(said(name, took), step)


def shortened(text: str, longest: int) -> str:
    """`text`, cut to `longest` characters with an ellipsis if it is longer."""
    return text if len(text) <= longest else text[: longest - 1] + "…"


def quoted(exc: BaseException) -> str:
    """A user's exception in a frame: its type and the start of its message."""
    said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return carryable(shortened(said, LONGEST_RESULT))


def _text_or_none(value: Any) -> str | None:
    return None if value is None else carryable(str(value))
