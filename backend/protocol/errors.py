"""Turn failures into errors a user can act on: a stable code plus a plain sentence."""

from __future__ import annotations

from collections.abc import Callable

import openai
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from backend.store.records import carryable
from schemas import ChatResponse, ErrorCode

# Redis or the database out of reach: a request may be tried again, it is not our bug.
SHARED_STATE_ERRORS = (RedisError, SQLAlchemyError, OSError)
UNREACHABLE = "The server cannot reach its shared state (Redis or the database); try again shortly."


class ChatError(Exception):
    """A failure to report to the client as an `error` frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        # It may quote a model server's own words, which may hold anything.
        message = carryable(message)
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    def frame(self) -> ChatResponse:
        """The `error` frame that reports this failure."""
        return ChatResponse.bot("error", self.message, code=self.code)


class Draining(Exception):
    """The server is stopping: it takes no new sockets, streams or replies."""

    def __init__(self) -> None:
        super().__init__("The server is restarting; try again in a moment.")


class ClientGone(Exception):
    """The client's connection closed; nothing more can be sent to it."""


# A special case: the error for an exception, or None to go on up its class hierarchy.
Special = Callable[[BaseException, str, bool], ChatError | None]
Template = tuple[ErrorCode, str]

INTERNAL: Template = ("internal", "The server failed while answering; the error has been logged.")
TIMED_OUT: Template = (
    "upstream_timeout",
    "The model server at {url} stopped responding (timed out). Try again, or raise CHAT_TIMEOUT.",
)


def _status_detail(exc: BaseException) -> str:
    body = exc.body if isinstance(exc, openai.APIStatusError) else None
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


def _connection_failure(exc: BaseException, url: str, streamed: bool) -> ChatError:
    """A refused connection is a server that is not there; anything else broke off a reply."""
    if streamed or not _is_connect_failure(exc):
        return ChatError(
            "upstream_dropped",
            f"The connection to the model server at {url} broke off before the reply was complete.",
        )
    return ChatError(
        "upstream_unreachable",
        f"Cannot reach the model server at {url}. Is it running? Check OPENAI_BASE_URL.",
    )


def _empty_stream(exc: BaseException, url: str, streamed: bool) -> ChatError | None:
    """LangChain's complaint about a stream that ended without a single chunk of text."""
    if "No generations found in stream" not in str(exc):
        return None
    return ChatError(
        "upstream_rejected",
        "The model server ended the reply without sending any text; the request may not "
        "fit the model's context. Try a shorter question, or reset the conversation.",
    )


# Exception type -> (code, message template), looked up along the exception's MRO, most
# specific class first, as Starlette looks up exception handlers. Templates may use {url} (the
# model server), {status} and {detail} (an HTTP error's status and the server's own words, if
# any) and {message} (the exception's).
RULES: dict[type[BaseException], Template | Special] = {
    openai.AuthenticationError: (
        "upstream_auth",
        "The model server at {url} rejected the API key (401){detail}. Check OPENAI_API_KEY.",
    ),
    openai.PermissionDeniedError: (
        "upstream_auth",
        "The API key may not use this model (403){detail}. Check OPENAI_API_KEY and CHAT_MODEL.",
    ),
    openai.RateLimitError: (
        "upstream_rate_limited",
        "The model server is rate limiting requests (429){detail}. Wait a moment and ask again.",
    ),
    openai.NotFoundError: (
        "upstream_rejected",
        "The model server does not know this model or path (404){detail}. "
        "Check CHAT_MODEL and OPENAI_BASE_URL.",
    ),
    # The SDK raises this for every status of 500 and above.
    openai.InternalServerError: (
        "upstream_unavailable",
        "The model server failed with HTTP {status}{detail}. Try again shortly.",
    ),
    openai.APIStatusError: (
        "upstream_rejected",
        "The model server refused the request with HTTP {status}{detail}.",
    ),
    openai.APITimeoutError: TIMED_OUT,
    TimeoutError: TIMED_OUT,
    openai.APIConnectionError: _connection_failure,
    ValueError: _empty_stream,
    openai.APIError: ("upstream_rejected", "The model server reported an error: {message}"),
    Exception: INTERNAL,
}


def describe_upstream(exc: BaseException, upstream_url: str, streamed: bool) -> ChatError:
    """Map an exception raised while talking to the model server to a `ChatError`.

    `streamed` says whether part of the reply had already arrived, which tells a dropped
    stream apart from a server that could not be reached at all.
    """
    if isinstance(exc, ChatError):
        return exc
    for cls in type(exc).__mro__:
        rule = RULES.get(cls)
        if rule is None:
            continue
        if not isinstance(rule, tuple):
            found = rule(exc, upstream_url, streamed)
            if found is None:
                continue
            return found
        code, template = rule
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        message = exc.message if isinstance(exc, openai.APIError) else str(exc)
        return ChatError(
            code,
            template.format(
                url=upstream_url, status=status, detail=_status_detail(exc), message=message
            ),
        )
    return ChatError(*INTERNAL)


def is_retryable(exc: BaseException) -> bool:
    """Failures worth one quick retry when no token has arrived yet."""
    if isinstance(exc, openai.APITimeoutError):
        return False  # it already waited the whole timeout
    if isinstance(exc, openai.RateLimitError | openai.APIConnectionError):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500
