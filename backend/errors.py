"""Turn failures into errors a user can act on: a stable code plus a plain sentence."""

from __future__ import annotations

import openai

from schemas import ChatResponse, ErrorCode


class ChatError(Exception):
    """A failure to report to the client as an `error` frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    def frame(self) -> ChatResponse:
        """The `error` frame that reports this failure."""
        return ChatResponse.bot("error", self.message, code=self.code)


class ClientGone(Exception):
    """The client's connection closed; nothing more can be sent to it."""


def _status_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        detail = body.get("message") or body.get("error")
        if isinstance(detail, dict):
            detail = detail.get("message")
        if isinstance(detail, str) and detail:
            return f": {detail}"
    return ""


def _is_connect_failure(exc: BaseException) -> bool:
    """Whether the chain of causes shows the TCP connection was never made."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or type(seen).__name__ == "ConnectError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_upstream(exc: BaseException, upstream_url: str, streamed: bool) -> ChatError:
    """Map an exception raised while talking to the model server to a `ChatError`.

    `streamed` says whether part of the reply had already arrived, which tells a dropped
    stream apart from a server that could not be reached at all.
    """
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, openai.AuthenticationError):
        return ChatError(
            "upstream_auth",
            f"The model server at {upstream_url} rejected the API key (401){_status_detail(exc)}. "
            "Check OPENAI_API_KEY.",
        )
    if isinstance(exc, openai.PermissionDeniedError):
        return ChatError(
            "upstream_auth",
            f"The API key may not use this model (403){_status_detail(exc)}. "
            "Check OPENAI_API_KEY and CHAT_MODEL.",
        )
    if isinstance(exc, openai.RateLimitError):
        return ChatError(
            "upstream_rate_limited",
            f"The model server is rate limiting requests (429){_status_detail(exc)}. "
            "Wait a moment and ask again.",
        )
    if isinstance(exc, openai.NotFoundError):
        return ChatError(
            "upstream_rejected",
            f"The model server does not know this model or path (404){_status_detail(exc)}. "
            "Check CHAT_MODEL and OPENAI_BASE_URL.",
        )
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500:
            return ChatError(
                "upstream_unavailable",
                f"The model server failed with HTTP {exc.status_code}{_status_detail(exc)}. "
                "Try again shortly.",
            )
        return ChatError(
            "upstream_rejected",
            f"The model server refused the request with HTTP {exc.status_code}"
            f"{_status_detail(exc)}.",
        )
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return ChatError(
            "upstream_timeout",
            f"The model server at {upstream_url} stopped responding (timed out). "
            "Try again, or raise CHAT_TIMEOUT.",
        )
    if isinstance(exc, openai.APIConnectionError):
        if streamed or not _is_connect_failure(exc):
            return ChatError(
                "upstream_dropped",
                f"The connection to the model server at {upstream_url} broke off "
                "before the reply was complete.",
            )
        return ChatError(
            "upstream_unreachable",
            f"Cannot reach the model server at {upstream_url}. "
            "Is it running? Check OPENAI_BASE_URL.",
        )
    if isinstance(exc, ValueError) and "No generations found in stream" in str(exc):
        return ChatError(
            "upstream_rejected",
            "The model server ended the reply without sending any text; the request may not "
            "fit the model's context. Try a shorter question, or reset the conversation.",
        )
    if isinstance(exc, openai.APIError):
        return ChatError("upstream_rejected", f"The model server reported an error: {exc.message}")
    return ChatError("internal", "The server failed while answering; the error has been logged.")


def is_retryable(exc: BaseException) -> bool:
    """Failures worth one quick retry when no token has arrived yet."""
    if isinstance(exc, openai.APITimeoutError):
        return False  # it already waited the whole timeout
    if isinstance(exc, openai.RateLimitError | openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500
