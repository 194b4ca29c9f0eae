"""The one writer of a WebSocket: frames go out in order, tokens that queue up go as one frame."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.websockets import WebSocketDisconnect

from backend.errors import ClientGone
from schemas import ChatResponse

log = logging.getLogger(__name__)

# Text of consecutive bot tokens not yet sent; becomes a single `stream` frame.
Pending = ChatResponse | list[str]
# Frames waiting for a client that has stopped reading; beyond this it is cut off rather than
# letting its backlog grow without bound. (A reply's tokens merge into one entry.)
MAX_PENDING = 1000


def encode(item: Pending) -> str:
    """The JSON text of a queued frame or run of tokens."""
    if isinstance(item, list):
        item = ChatResponse.tokens("".join(item))
    return item.to_json()


class Outbox:
    """Queues frames for one socket and sends them from a single task.

    Sending never blocks the producer: a reply appends its tokens and carries on. When the
    socket is slower than the model, the tokens that pile up behind it are merged into one
    `stream` frame, so a slow client costs fewer, larger frames instead of a growing backlog.
    Once a send fails, or a client that does not read lets `MAX_PENDING` frames pile up, every
    later `send` or `token` raises `ClientGone`.
    """

    def __init__(
        self, send_text: Callable[[str], Awaitable[None]], max_pending: int = MAX_PENDING
    ) -> None:
        self._send_text = send_text
        self._max_pending = max_pending
        self._pending: list[Pending] = []
        self._wake = asyncio.Event()
        self._gone = False

    def send(self, frame: ChatResponse) -> None:
        """Queue one frame."""
        self._check()
        self._pending.append(frame)
        self._wake.set()

    def token(self, text: str) -> None:
        """Queue a piece of bot text, merging it with tokens still waiting to go."""
        self._check()
        if self._pending and isinstance(self._pending[-1], list):
            self._pending[-1].append(text)
        else:
            self._pending.append([text])
            self._wake.set()

    def _check(self) -> None:
        if self._gone:
            raise ClientGone("the client's connection is closed")
        if len(self._pending) >= self._max_pending:
            self._gone = True
            raise ClientGone(f"the client left {len(self._pending)} frames unread")

    async def run(self) -> None:
        """Send whatever is queued, until cancelled or the socket fails."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    batch, self._pending = self._pending, []
                    for item in batch:
                        await self._send_text(encode(item))
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            # Starlette raises WebSocketDisconnect for a peer that left, RuntimeError for a
            # socket already closed on our side.
            log.debug("socket writer stopped: %r", exc)
        finally:
            self._gone = True
