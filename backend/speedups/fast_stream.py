"""Hand LangChain each stream chunk as the JSON dict it arrived as, and send its messages as
they are.

`ChatOpenAI` accepts plain dicts from its client and would otherwise get a pydantic object per
chunk from the openai SDK, only to turn it straight back into a dict (`model_dump`). Building
those objects is the largest single CPU cost of relaying a token, so this wrapper reads the
SDK's server-sent events and parses each one with `json` alone. Errors stay the SDK's own: the
event reader raises `APIConnectionError` / `APITimeoutError`, and an error event becomes an
`APIError` exactly as in the SDK.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import openai


class DictChunkStream:
    """An SDK stream read as dicts; usable as LangChain uses the SDK's `AsyncStream`."""

    def __init__(self, stream: openai.AsyncStream[Any]) -> None:
        self._stream = stream

    async def __aenter__(self) -> DictChunkStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stream.close()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        # The events after [DONE] are read too (there are none): a fully read body lets the
        # HTTP/1.1 connection go back to the pool.
        async for event in self._stream._iter_events():
            if event.data.startswith("[DONE]"):
                continue
            data = event.json()
            if isinstance(data, dict) and data.get("error"):
                error = data["error"]
                message = error.get("message") if isinstance(error, dict) else None
                raise openai.APIError(
                    message=message
                    if isinstance(message, str) and message
                    else "An error occurred during streaming",
                    request=self._stream.response.request,
                    body=error,
                )
            if isinstance(data, dict):
                yield data


class DictChunkCompletions:
    """Stands in for `AsyncOpenAI().chat.completions`: streams come back as `DictChunkStream`."""

    def __init__(self, completions: Any) -> None:
        self._completions = completions

    async def create(self, **payload: Any) -> Any:
        # The SDK walks every parameter through its type-directed transform, which for the
        # messages (a list of unions of typed dicts) costs more than the rest of the request.
        # LangChain's messages are plain JSON already: they go in the body as they are.
        messages = payload.pop("messages", None)
        if messages is not None:
            payload["messages"] = []
            payload["extra_body"] = {**(payload.get("extra_body") or {}), "messages": messages}
        result = await self._completions.create(**payload)
        if isinstance(result, openai.AsyncStream):
            return DictChunkStream(result)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._completions, name)
