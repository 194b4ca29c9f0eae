"""Answering one question: run the chain, stream its frames to a sink, record the turn."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.messages.utils import count_tokens_approximately
from langchain_core.runnables import RunnableConfig

from backend.config.settings import Settings
from backend.model.callbacks import ProgressHandler, StreamingHandler
from backend.model.chain import ChatChain
from backend.model.history import History, TokenCounter
from backend.model.turn import Turn
from backend.model.upstream import Upstream
from backend.model.usage import counted, reported
from backend.observe import logs
from backend.observe.metrics import Metrics
from backend.protocol.errors import ChatError, describe_upstream, is_retryable
from schemas import ChatResponse, EndStatus, ErrorCode

log = logging.getLogger(__name__)


class Replier:
    """Answers questions with one chain; shared by every connection of an app."""

    def __init__(
        self, settings: Settings, chain: ChatChain, upstream: Upstream, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.chain = chain
        self.upstream = upstream
        self.metrics = metrics

    async def answer(self, turn: Turn, history: History) -> EndStatus:
        """Stream the reply to `turn`'s question, from `start` to exactly one `end`.

        Cancelling the task that runs this is how a reply is stopped: the upstream request is
        closed, the text streamed so far stays in `turn`, and `end` says `interrupted`.
        """
        status: EndStatus = "error"
        failure: ErrorCode | None = None
        started = time.perf_counter()
        logs.reply_id.set(uuid.uuid4().hex[:12])  # on every log line of this reply
        turn.send(ChatResponse.bot("start"))
        sent: list[list[BaseMessage]] = []  # the history sent with the question, once it is
        try:
            turn.usage = reported(await self._generate(turn, history, sent))
            status = "completed"
        except asyncio.CancelledError:
            status = "interrupted"
            raise
        except Exception as exc:
            error = await self._describe(exc, streamed=turn.streamed)
            if error.code == "internal":
                log.exception("reply failed")
            else:
                log.warning("reply failed: %s (%r)", error.message, exc)
            turn.send(error.frame())
            failure = error.code
        finally:
            if turn.usage is None and sent and (turn.streamed or status == "completed"):
                messages = self.chain.messages(sent[0], turn.question)
                turn.usage = counted(messages, turn.text, self.count)
            end = ChatResponse.bot("end", status=status)
            end.usage = turn.usage
            turn.send(end)
            log.info("reply %s, %d characters", status, len(turn.text))
            first = turn.first_token_at
            self.metrics.reply_ended(
                status,
                failure,
                None if first is None else first - started,
                turn.pieces,
                turn.usage,
            )
        return status

    @property
    def count(self) -> TokenCounter:
        """The model's own tokenizer when it is known, else an estimate."""
        window = self.upstream.context
        return window.count if window is not None else count_tokens_approximately

    async def _generate(
        self, turn: Turn, history: History, sent: list[list[BaseMessage]]
    ) -> BaseMessage:
        """Run the chain, retrying once, quickly, if it failed before its first token."""
        await self.upstream.ensure_ready(turn.info)
        callbacks: list[BaseCallbackHandler] = [
            StreamingHandler(turn.token),
            ProgressHandler(turn.info, self.upstream.model),
        ]
        config = RunnableConfig(callbacks=callbacks)
        earlier = self._history_for(turn.question, history)
        sent.append(earlier)  # the prompt is formatted again only if usage must be counted
        for attempt in (1, 2):
            try:
                return await self.chain.ainvoke(earlier, turn.question, config)
            except Exception as exc:
                if turn.streamed or attempt == 2 or not is_retryable(exc):
                    raise
                reason = await self._describe(exc, streamed=False)
                log.info("retrying once after: %s", reason.message)
                turn.info(f"Retrying once: {reason.message}")
                await asyncio.sleep(self.settings.chat_retry_delay)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _describe(self, exc: BaseException, streamed: bool) -> ChatError:
        """The error to show for `exc`, preferring what the upstream knows about itself."""
        if isinstance(exc, ChatError):
            return exc
        known = await self.upstream.explain_failure(exc)
        return known or describe_upstream(exc, self.upstream.url, streamed=streamed)

    def _history_for(self, question: str, history: History) -> list[BaseMessage]:
        """The earlier turns to send: all of them, or as many as the model's context holds."""
        window = self.upstream.context
        if window is None:
            return history.messages
        fixed = window.count(self.chain.messages([], question))
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
