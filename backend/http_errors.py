"""HTTP refusals as one sentence each: `{"detail": "..."}`, whatever the route or the mistake."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# How each place a request's value comes from is named in a refusal.
PLACES = {
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
    "body": "body field",
}


def validation_sentence(errors: Sequence[Any]) -> str:
    """The first thing wrong with a request, as a sentence that names where it is.

    FastAPI's own answer is a list of objects that echo the input back; a client wants to know
    what to change, and an over-long or hostile value has no place in the answer.
    """
    if not errors:
        return "The request is malformed."
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    place = PLACES.get(location[0], location[0]) if location else "request"
    name = ".".join(location[1:])
    message = str(first.get("msg", "is not valid")).rstrip(".")
    if not name:
        return f"Bad {place}: {message}."
    return f"Bad {place} {name[:64]!r}: {message}."


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(
        {"detail": validation_sentence(exc.errors())},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


def install(app: FastAPI) -> None:
    """Answer every malformed request to `app` with a sentence."""
    app.add_exception_handler(RequestValidationError, invalid_request)
