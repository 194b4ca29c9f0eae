"""What one client is sent, in order: frames, runs of tokens that queued up, and a last close.

A socket and an SSE response each own an `Outbox`; a conversation writes into the outboxes of
every client joined to it and never waits for any of them.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from backend.chat.gate import Gate
from backend.protocol.errors import ClientGone
from backend.speedups.eager import start_eagerly
from schemas import ChatResponse

# Frames waiting for a client that has stopped reading; beyond this it is cut off rather than
# letting its backlog grow without bound. (A reply's tokens merge into one entry, and the
# history a client is sent when it joins does not count.)
MAX_PENDING = 1000
OVERFLOW_CODE = 1008
# Tokens closer together than this (seconds) are not sent one by one from the task that
# produced them: they queue, and the writer sends those that piled up as one frame.
DIRECT_GAP = 0.001


@dataclass
class TokenRun:
    """Consecutive pieces of bot text not yet sent; they go as one `stream` frame."""

    parts: list[str] = field(default_factory=list)
    seq: int | None = None

    def frame(self) -> ChatResponse:
        """The merged frame, carrying the `seq` of its last piece."""
        return ChatResponse.tokens("".join(self.parts), seq=self.seq)

    def to_json(self) -> str:
        """The merged frame's JSON, as `frame().to_json()` gives it, without building a model."""
        text = json.dumps("".join(self.parts), ensure_ascii=False)
        if self.seq is None:
            return f'{{"sender":"bot","message":{text},"type":"stream"}}'
        return f'{{"sender":"bot","message":{text},"type":"stream","seq":{self.seq}}}'


@dataclass(frozen=True)
class Raw:
    """A frame already in JSON, as another worker published it, with its `seq`."""

    seq: int
    text: str

    def to_json(self) -> str:
        return self.text


@dataclass(frozen=True)
class Close:
    """The server ends this client's connection, after everything queued before it."""

    code: int
    reason: str


Pending = ChatResponse | TokenRun | Raw | Close
SendText = Callable[[str], Coroutine[Any, Any, None]]


class State(enum.Enum):
    """Where an outbox is in its life; it only ever moves down this list."""

    OPEN = "open"  # frames may be queued
    CLOSING = "closing"  # its last item, a `Close`, is queued: nothing more may be
    GONE = "gone"  # its writer has stopped: nothing queued will be sent


def token_json(text: str, seq: int | None) -> str:
    """One token as the `stream` frame a socket is sent."""
    return TokenRun([text], seq).to_json()


def seq_of(item: ChatResponse | TokenRun | Raw) -> int | None:
    """The `seq` a queued item is sent with."""
    return item.seq


class Outbox:
    """Queues what one client is sent; its writer takes everything queued at once.

    Queueing never blocks: a reply appends its tokens and carries on. When the client is slower
    than the model, the tokens that pile up behind it merge into one `stream` frame, so a slow
    client costs fewer, larger frames instead of a growing backlog. Once the writer has stopped,
    or a client that does not read lets `max_pending` frames pile up, every later `send` or
    `token` raises `ClientGone`.
    """

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self._max_pending = max_pending
        self._pending: list[Pending] = []
        self._preloaded = 0
        self._wake = Gate()
        self.state = State.OPEN
        self.stopped = Gate()
        # See `attach`.
        self._direct: SendText | None = None
        self.format_token: Callable[[str, int | None], str] = token_json
        self._writer_waiting = False
        self._sending: asyncio.Task[None] | None = None  # a direct send still under way
        self._sent_at = 0.0  # when the last direct send was (`time.perf_counter()`)

    def __repr__(self) -> str:
        direct = ", direct" if self._direct is not None else ""
        return f"<Outbox {self.state.value}, {len(self._pending)} queued{direct}>"

    @property
    def gone(self) -> bool:
        """Whether this client can no longer be sent anything."""
        return self.state is not State.OPEN

    def attach(
        self, send: SendText | None, format_token: Callable[[str, int | None], str] = token_json
    ) -> None:
        """Let a token be sent by the task that produced it, through the writer's own `send`,
        when nothing is queued and the writer waits; `format_token` writes its text (a
        `stream` frame's JSON by default). `send=None` turns it off again: every token then
        waits for the writer."""
        self._direct = send if self.state is State.OPEN else None
        self.format_token = format_token

    def send(self, frame: ChatResponse | Raw) -> None:
        """Queue one frame."""
        self._check()
        self._pending.append(frame)
        self._wake.set()

    def preload(self, frames: Iterable[ChatResponse | Raw]) -> None:
        """Queue frames the client missed (a replay), however many, ahead of live ones."""
        self._check()
        before = len(self._pending)
        self._pending.extend(frames)
        self._preloaded += len(self._pending) - before
        self._wake.set()

    def token(self, text: str, seq: int | None = None) -> None:
        """Queue a piece of bot text, merging it with tokens still waiting to go."""
        pending = self._pending
        if self.state is not State.OPEN or len(pending) - self._preloaded >= self._max_pending:
            self._check()
        if not pending:
            direct = self._direct
            if self._writer_waiting and direct is not None and self._sending is None:
                now = time.perf_counter()
                if now - self._sent_at >= DIRECT_GAP:
                    self._sent_at = now
                    self._send_now(direct, self.format_token(text, seq))
                    return
            self._pending.append(TokenRun([text], seq))
            self._wake.set()
            return
        last = pending[-1]
        if type(last) is TokenRun:
            last.parts.append(text)
            last.seq = seq
        else:
            self._pending.append(TokenRun([text], seq))
            self._wake.set()

    def _send_now(self, direct: SendText, text: str) -> None:
        try:
            self._sending = start_eagerly(direct(text))
        except Exception as exc:  # the socket is closed or closing
            self.stop()
            raise ClientGone("the client's connection is closed") from exc
        if self._sending is not None:  # the client is slow: the writer waits for it
            self._sending.add_done_callback(self._sent)
            self._wake.set()

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending = None
        if not task.cancelled() and task.exception() is not None:
            self.stop()
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        """Send what is queued, then end the connection with `code`; nothing more is queued."""
        if self.state is not State.OPEN:
            return
        self._pending.append(Close(code, reason))
        self.state = State.CLOSING
        self._wake.set()

    def _check(self) -> None:
        if self.state is not State.OPEN:
            raise ClientGone("the client's connection is closed")
        if len(self._pending) - self._preloaded >= self._max_pending:
            unread = len(self._pending)
            # Nothing queued will be read: all that is left to send is the close.
            self._pending = [Close(OVERFLOW_CODE, "Too many unread frames.")]
            self.state = State.CLOSING
            raise ClientGone(f"the client left {unread} frames unread")

    async def take(self) -> list[Pending]:
        """Wait for something to send, then take all of it (after any direct send)."""
        while not self._pending or self._sending is not None:
            if self._sending is not None:
                await asyncio.wait([self._sending])
                continue
            self._wake.clear()
            self._writer_waiting = True
            try:
                await self._wake.wait()
            finally:
                self._writer_waiting = False
        batch, self._pending = self._pending, []
        self._preloaded = 0
        return batch

    def take_now(self) -> list[Pending]:
        """Everything queued, without waiting (possibly nothing)."""
        batch, self._pending = self._pending, []
        self._preloaded = 0
        return batch

    def stop(self) -> None:
        """The writer has stopped: the client is gone."""
        self.state = State.GONE
        self._direct = None
        self.stopped.set()
