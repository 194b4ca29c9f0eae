"""Refusals as responses, said once for every route and handshake: one sentence each
(`{"detail": "..."}`), with the status and headers that go with it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from backend.chat.conversations import PastTheEnd, UnknownConversation
from backend.model.assistants import UnknownAssistant
from backend.observe.logs import Throttled
from backend.protocol.errors import SHARED_STATE_ERRORS, UNREACHABLE, ChatError, Draining
from backend.users.auth import Unauthorized
from backend.users.quotas import RateLimited
from backend.web.origin import ForeignOrigin
from backend.webhooks.events import UnknownWebhook

log = logging.getLogger(__name__)
# Refusals are the client's doing, and anyone can provoke them as fast as they like.
refusals = Throttled(log)

CHALLENGE = {"WWW-Authenticate": "Bearer"}
# How each place a request's value comes from is named in a refusal.
PLACES = {
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
    "body": "body field",
}

REFUSALS = (
    ForeignOrigin,
    Draining,
    Unauthorized,
    RateLimited,
    UnknownConversation,
    PastTheEnd,
    UnknownAssistant,
    UnknownWebhook,
)


def answer(refused: BaseException) -> tuple[int, str, dict[str, str]]:
    """The status, sentence and headers that answer `refused`."""
    if isinstance(refused, ForeignOrigin):
        return status.HTTP_403_FORBIDDEN, str(refused), {}
    if isinstance(refused, Unauthorized):
        return status.HTTP_401_UNAUTHORIZED, str(refused), CHALLENGE
    if isinstance(refused, RateLimited):
        return status.HTTP_429_TOO_MANY_REQUESTS, refused.message, refused.headers
    if isinstance(refused, UnknownConversation):
        return status.HTTP_404_NOT_FOUND, str(refused), {}
    if isinstance(refused, (PastTheEnd, UnknownAssistant, UnknownWebhook)):
        return status.HTTP_422_UNPROCESSABLE_CONTENT, str(refused), {}
    if isinstance(refused, Draining):
        return status.HTTP_503_SERVICE_UNAVAILABLE, str(refused), {"Retry-After": "1"}
    return status.HTTP_503_SERVICE_UNAVAILABLE, UNREACHABLE, {"Retry-After": "1"}


def described(refusals: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these refusals (status: why), each a `{"detail": "..."}`."""
    return {code: {"description": why} for code, why in refusals.items()}


def unprocessable(message: str) -> HTTPException:
    """A 422 that says, in `message`, what is wrong with the request."""
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def refusal(error: ChatError) -> HTTPException:
    """A failure to start a reply, before anything of it went out."""
    if error.code == "unavailable":
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, error.message)
    return unprocessable(error.message)


def logged(refused: BaseException, where: str) -> None:
    """One line for a refusal: a warning for what the server lacks, info for the client's
    doing, and neither more often than once in a while."""
    if isinstance(refused, SHARED_STATE_ERRORS):
        log.warning("%s failed: %s", where, refused)
    else:
        kind = type(refused).__name__
        refusals.log(logging.INFO, kind, "refused %s: %s", where, refused)


def denial(refused: BaseException) -> PlainTextResponse:
    """The HTTP response that refuses a WebSocket handshake."""
    logged(refused, "a socket")
    code, sentence, headers = answer(refused)
    return PlainTextResponse(sentence, status_code=code, headers=headers)


async def refusal_response(request: Request, exc: Exception) -> JSONResponse:
    logged(exc, f"{request.method} {request.url.path}")
    code, sentence, headers = answer(exc)
    body: dict[str, str] = {"detail": sentence}
    if isinstance(exc, SHARED_STATE_ERRORS):
        body["code"] = "unavailable"
    return JSONResponse(body, status_code=code, headers=headers)


def validation_sentence(errors: Sequence[Any]) -> str:
    """The first thing wrong with a request, as a sentence that names where it is.

    FastAPI's own answer is a list of objects that echo the input back; a client wants to know
    what to change, and an over-long or hostile value has no place in the answer.
    """
    if not errors:
        return "The request is malformed."
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return "The body is not valid JSON: send a JSON object."
    if location == ["body"] and first.get("type") in ("model_attributes_type", "dict_type"):
        return "The body must be a JSON object, sent with Content-Type: application/json."
    if location == ["body"] and first.get("type") == "missing":
        return "The body is missing: send a JSON object, with Content-Type: application/json."
    place = PLACES.get(location[0], location[0]) if location else "request"
    name = ".".join(location[1:])
    # A validator's own sentence, without pydantic's "Value error, " before it.
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ").rstrip(".")
    if not name:
        return f"Bad {place}: {message}."
    return f"Bad {place} {name[:64]!r}: {message}."


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse(
        {"detail": validation_sentence(errors)},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


# FastAPI's own answer to a body its JSON parser gave up on (nested too deep, say): not a
# sentence that says what to change.
UNPARSED_BODY = "There was an error parsing the body"


async def http_refusal(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StarletteHTTPException) and exc.detail == UNPARSED_BODY:
        exc = StarletteHTTPException(
            exc.status_code,
            "The body could not be read as JSON: it nests too deeply or is cut short.",
        )
    return await http_exception_handler(request, cast(StarletteHTTPException, exc))


async def client_gone(request: Request, exc: Exception) -> Response:
    # The client left while its body was being read (or was refused as too large): there is
    # no one to answer, and nothing went wrong here.
    return Response(status_code=status.HTTP_400_BAD_REQUEST)


def install(app: FastAPI) -> None:
    """Answer every refusal and malformed request to `app` with a sentence."""
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_refusal)
    app.add_exception_handler(ClientDisconnect, client_gone)
    for kind in (*REFUSALS, *SHARED_STATE_ERRORS):
        app.add_exception_handler(kind, refusal_response)
