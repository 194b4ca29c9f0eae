"""Server-Sent Events: the headers every stream is sent with, and a response that writes one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from backend.chat.outbox import SendText

# Nothing may wait in a cache or a proxy's buffer (nginx reads X-Accel-Buffering).
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(Response):
    """An SSE response that `write` writes, piece by piece, until it returns or the client
    leaves.

    What `StreamingResponse` does, with plain asyncio: the pieces are written from a task of
    their own while this one waits for the client's disconnect, and whichever ends first ends
    the other; then the background task runs.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        write: Callable[[SendText], Awaitable[None]],
        headers: Mapping[str, str],
        background: BackgroundTask | None = None,
    ) -> None:
        self.write = write
        self.status_code = 200
        self.background = background
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        writing = asyncio.ensure_future(self._write(send))
        listening = asyncio.ensure_future(self._listen(receive))
        try:
            await asyncio.wait((writing, listening), return_when=asyncio.FIRST_COMPLETED)
        finally:
            writing.cancel()
            listening.cancel()
            await asyncio.wait((writing, listening))
            if self.background is not None:
                await self.background()
        failure = None if writing.cancelled() else writing.exception()
        if failure is not None and not isinstance(failure, OSError):  # OSError: the client left
            raise failure

    async def _write(self, send: Send) -> None:
        async def piece(text: str) -> None:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await self.write(piece)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _listen(self, receive: Receive) -> None:
        with contextlib.suppress(OSError):
            while (await receive())["type"] != "http.disconnect":
                pass
