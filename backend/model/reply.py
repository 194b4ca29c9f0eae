"""Answering one question: run the chain, stream its frames to a sink, record the turn."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage, messages_to_dict
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.runnables import RunnableConfig

from backend.config.settings import Settings
from backend.model.assistants import Assistants
from backend.model.callbacks import (
    ModelCalls,
    ProgressHandler,
    StepHandler,
    StreamingHandler,
    quoted,
    token_text,
)
from backend.model.chain import Chain
from backend.model.history import History, TokenCounter
from backend.model.turn import Turn
from backend.model.upstream import Upstream
from backend.model.usage import counted, reported
from backend.observe import logs
from backend.observe.metrics import Metrics
from backend.protocol.errors import ChatError, describe_upstream, is_retryable
from schemas import ChatResponse, EndStatus, ErrorCode, Timings

log = logging.getLogger(__name__)


class Run:
    """One reply's run of its chain: what its callbacks saw."""

    def __init__(
        self, chain: Chain, turn: Turn, context: Mapping[str, Any] | None, count: TokenCounter
    ) -> None:
        self.chain = chain
        self.context = context
        # The model's tool calls and the tools' results, in the order they came.
        self.exchanged: list[BaseMessage] = []
        self.tokens = StreamingHandler(turn.token)
        # A user's chain only: its steps, and its every model call.
        self.steps = StepHandler(turn.step, self.exchanged.append)
        self.calls = ModelCalls(count, self.exchanged.append)

    @property
    def acted(self) -> bool:
        """Whether the chain has done anything that running it again would do twice: called a
        tool, searched, or had an answer from a model."""
        return self.steps.taken > 0 or self.calls.answered > 0


class Replier:
    """Answers questions with the app's assistants; shared by every connection of an app."""

    def __init__(
        self, settings: Settings, assistants: Assistants, upstream: Upstream, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.assistants = assistants
        self.upstream = upstream
        self.metrics = metrics

    async def answer(
        self,
        turn: Turn,
        history: History,
        assistant: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> EndStatus:
        """Stream the reply to `turn`'s question, from `start` to exactly one `end`, with the
        chain of the assistant called `assistant` (the default one's if None). A user's chain
        finds `context` (the conversation's `thread_id`, its `user`, ...) in its config's
        `configurable`.

        Cancelling the task that runs this is how a reply is stopped: the upstream request is
        closed, the text streamed so far stays in `turn`, and `end` says `interrupted`.
        """
        status: EndStatus = "error"
        failure: ErrorCode | None = None
        started = time.perf_counter()
        logs.reply_id.set(uuid.uuid4().hex[:12])  # on every log line of this reply
        turn.send(ChatResponse.bot("start"))
        sent: list[list[BaseMessage]] = []  # the history sent with the question, once it is
        run = Run(self.assistants.default.chain, turn, context, self.count)
        try:
            run.chain = self._chain_of(assistant)
            reply = await self._generate(turn, history, sent, run)
            if not turn.streamed and reply.text:  # a chain whose models did not stream
                turn.token(token_text_of(reply))
            turn.usage = reported(reply) if run.chain.built_in else run.calls.usage()
            status = "completed"
        except asyncio.CancelledError:
            status = "interrupted"
            run.steps.interrupted()
            raise
        except Exception as exc:
            error = await self._describe(exc, turn.streamed, run)
            if error.code in ("internal", "chain_error", "tool_error"):
                log.exception("reply failed: %s", error.message)
            else:
                log.warning("reply failed: %s (%r)", error.message, exc)
            turn.send(error.frame())
            failure = error.code
        finally:
            if run.exchanged:
                turn.exchanged[:] = messages_to_dict(answered(run.exchanged))
            if not run.chain.built_in:
                turn.usage = run.calls.usage()
            elif turn.usage is None and sent and (turn.streamed or status == "completed"):
                messages = run.chain.messages(sent[0], turn.question)
                turn.usage = counted(messages, turn.text, self.count)
            first = turn.first_token_at
            first_token = None if first is None else first - started
            end = ChatResponse.bot("end", status=status)
            end.usage = turn.usage
            end.timings = Timings(
                first_token_seconds=None if first_token is None else round(first_token, 6),
                duration_seconds=round(time.perf_counter() - started, 6),
            )
            turn.send(end)
            log.info("reply %s, %d characters", status, len(turn.text))
            self.metrics.reply_ended(
                status,
                failure,
                first_token,
                turn.pieces,
                turn.usage,
            )
        return status

    def _chain_of(self, assistant: str | None) -> Chain:
        try:
            return self.assistants.get(assistant).chain
        except KeyError:
            raise ChatError(
                "not_configured",
                f"This conversation's assistant, {assistant!r}, is not offered by this server "
                f"any more (it offers {', '.join(self.assistants.names)}); start a new "
                "conversation.",
            ) from None

    @property
    def count(self) -> TokenCounter:
        """The model's own tokenizer when it is known, else an estimate."""
        window = self.upstream.context
        return window.count if window is not None else count_tokens_approximately

    async def _generate(
        self, turn: Turn, history: History, sent: list[list[BaseMessage]], run: Run
    ) -> BaseMessage:
        """Run the chain, retrying once, quickly, if it failed before its first token."""
        await self.upstream.ensure_ready(turn.info)
        callbacks: list[BaseCallbackHandler] = [
            run.tokens,
            ProgressHandler(turn.info, self.upstream.model),
        ]
        config = RunnableConfig(callbacks=callbacks)
        if not run.chain.built_in:
            callbacks += [run.steps, run.calls]
            config["configurable"] = dict(run.context or {})
        earlier = self._history_for(turn.question, history, run.chain)
        sent.append(earlier)  # the prompt is formatted again only if usage must be counted
        for attempt in (1, 2):
            try:
                return await run.chain.ainvoke(earlier, turn.question, config)
            except Exception as exc:
                # Not a chain that has done something already (a tool may not be idempotent).
                if turn.streamed or attempt == 2 or not is_retryable(exc) or run.acted:
                    raise
                reason = await self._describe(exc, False, run)
                log.info("retrying once after: %s", reason.message)
                turn.info(f"Retrying once: {reason.message}")
                await asyncio.sleep(self.settings.chat_retry_delay)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _describe(self, exc: BaseException, streamed: bool, run: Run) -> ChatError:
        """The error to show for `exc`, preferring what the upstream knows about itself; a
        failure of the user's own chain or tool says which, and what it raised."""
        if isinstance(exc, ChatError):
            return exc
        known = await self.upstream.explain_failure(exc)
        error = known or describe_upstream(exc, self.upstream.url, streamed=streamed)
        if error.code != "internal" or run.chain.built_in:
            return error
        tool = run.steps.failed_tool(exc)
        if tool is not None:
            name, raised = tool
            return ChatError("tool_error", f"The tool {name!r} failed: {quoted(raised)}")
        return ChatError("chain_error", f"The assistant's chain failed: {quoted(exc)}")

    def _history_for(self, question: str, history: History, chain: Chain) -> list[BaseMessage]:
        """The earlier turns to send: all of them, or as many as the model's context holds."""
        window = self.upstream.context
        if window is None:
            return history.messages
        fixed = window.count(chain.messages([], question))
        reply_tokens = self.upstream.reply_tokens or 0
        room = window.tokens - reply_tokens - fixed
        if room < 0:
            raise ChatError(
                "bad_request",
                f"The question is too long for the model: with the system prompt it takes "
                f"{fixed:,} tokens, and the model's context holds {window.tokens:,} tokens "
                f"including {reply_tokens:,} for the reply.",
            )
        return history.fit(room, window.count)


def answered(exchanged: list[BaseMessage]) -> list[BaseMessage]:
    """The tool calls whose every call has its result, each followed by its results: what may
    go back to a model as history (a call without its result is refused)."""
    kept: list[BaseMessage] = []
    for index, message in enumerate(exchanged):
        calls = getattr(message, "tool_calls", None)
        if not isinstance(message, AIMessage) or not calls:
            continue
        wanted = {call["id"] for call in calls}
        results = [
            later
            for later in exchanged[index + 1 :]
            if isinstance(later, ToolMessage) and later.tool_call_id in wanted
        ]
        if {result.tool_call_id for result in results} == wanted:
            kept += [message, *results]
    return kept


def token_text_of(reply: BaseMessage) -> str:
    """A whole reply's text, as a streamed token would be given."""
    return token_text(reply.content)
