"""Failures map to stable codes and sentences a user can act on, by exception type."""

from __future__ import annotations

import httpx2
import openai
import pytest

from backend.protocol.errors import describe_upstream

URL = "http://127.0.0.1:9/v1"
REQUEST = httpx2.Request("POST", f"{URL}/chat/completions")


def status_error(cls: type[openai.APIStatusError], status: int) -> openai.APIStatusError:
    body = {"message": "the server's words"}
    return cls("failed", response=httpx2.Response(status, request=REQUEST), body=body)


class TeapotError(openai.RateLimitError):
    """A subclass the table does not name: found through its parent."""


@pytest.mark.parametrize(
    ("exc", "streamed", "code", "words"),
    [
        (status_error(openai.AuthenticationError, 401), False, "upstream_auth", ["(401)"]),
        (status_error(openai.PermissionDeniedError, 403), False, "upstream_auth", ["CHAT_MODEL"]),
        (status_error(openai.RateLimitError, 429), False, "upstream_rate_limited", ["(429)"]),
        (status_error(TeapotError, 429), False, "upstream_rate_limited", ["Wait a moment"]),
        (status_error(openai.NotFoundError, 404), False, "upstream_rejected", ["(404)"]),
        (status_error(openai.InternalServerError, 502), False, "upstream_unavailable", ["502"]),
        (status_error(openai.ConflictError, 409), False, "upstream_rejected", ["HTTP 409"]),
        (openai.APITimeoutError(REQUEST), False, "upstream_timeout", [URL, "CHAT_TIMEOUT"]),
        (TimeoutError(), True, "upstream_timeout", ["timed out"]),
        (openai.APIConnectionError(request=REQUEST), True, "upstream_dropped", ["broke off"]),
        (
            openai.APIError("overloaded", REQUEST, body=None),
            True,
            "upstream_rejected",
            ["overloaded"],
        ),
        (ValueError("No generations found in stream."), False, "upstream_rejected", ["any text"]),
        (ValueError("something else"), False, "internal", ["has been logged"]),
        (RuntimeError("bug"), False, "internal", ["has been logged"]),
    ],
)
def test_exception_maps_to_code_and_message(
    exc: BaseException, streamed: bool, code: str, words: list[str]
) -> None:
    error = describe_upstream(exc, URL, streamed=streamed)
    assert error.code == code
    for word in words:
        assert word in error.message


def test_status_errors_quote_the_server() -> None:
    error = describe_upstream(status_error(openai.RateLimitError, 429), URL, streamed=False)
    assert "(429): the server's words." in error.message


def test_refused_connection_is_unreachable_unless_a_reply_had_begun() -> None:
    refused = openai.APIConnectionError(request=REQUEST)
    refused.__cause__ = httpx2.ConnectError("Connection refused")
    assert describe_upstream(refused, URL, streamed=False).code == "upstream_unreachable"
    assert URL in describe_upstream(refused, URL, streamed=False).message
    assert describe_upstream(refused, URL, streamed=True).code == "upstream_dropped"
