"""Reading what a client sends: every frame becomes a message or a `bad_request` error."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from backend.protocol.errors import ChatError
from backend.store.records import UNSENDABLE
from schemas import CLIENT_MESSAGE, CLIENT_TYPES, Question, Regenerate, Reset, Stop

ClientMessage = Question | Stop | Reset | Regenerate
EXPECTED_TYPES = ", ".join(CLIENT_TYPES)
HOW_TO_ASK = 'Send a question as plain text or as {"type": "question", "message": "..."}.'


def bad_request(message: str) -> ChatError:
    """A `bad_request` error with `message`."""
    return ChatError("bad_request", message)


def check_question(text: str, max_chars: int, how_to_ask: str = HOW_TO_ASK) -> str:
    """Return `text` if it is a question we can send on, else raise `ChatError` (an empty one
    told `how_to_ask` where it came from)."""
    if not text.strip():
        raise bad_request(f"The question is empty. {how_to_ask}")
    if len(text) > max_chars:
        raise bad_request(
            f"The question is {len(text):,} characters long; the limit is {max_chars:,}."
        )
    bad = UNSENDABLE.search(text)
    if bad is not None:
        raise bad_request(
            f"The question holds a character that no text can carry (U+{ord(bad.group()):04X} "
            f"at position {bad.start() + 1:,}); remove it and ask again."
        )
    return text


def _from_object(data: dict[str, Any], max_chars: int) -> ClientMessage:
    kind = data.get("type")
    if kind is None:
        raise bad_request(f"The message has no 'type'; expected one of: {EXPECTED_TYPES}.")
    if kind not in CLIENT_TYPES:
        raise bad_request(f"Unknown message type {kind!r}; expected one of: {EXPECTED_TYPES}.")
    if kind == "question" and not isinstance(data.get("message"), str):
        raise bad_request(f"A question needs a 'message' string. {HOW_TO_ASK}")
    try:
        message = CLIENT_MESSAGE.validate_python(data)
    except ValidationError as exc:
        raise bad_request(f"Invalid {kind!r} message: {exc.errors()[0]['msg']}.") from exc
    if isinstance(message, Question):
        check_question(message.message, max_chars)
    if isinstance(message, Regenerate) and message.message is not None:
        check_question(message.message, max_chars)
    return message


def parse_client_frame(
    frame: Mapping[str, Any], *, max_frame_bytes: int, max_question_chars: int
) -> ClientMessage:
    """Parse one `websocket.receive` event into a client message.

    A text frame holding a JSON object is a typed message; any other text is a question, so
    clients that send plain text keep working.
    """
    text = frame.get("text")
    if text is None:
        raise bad_request("Binary frames are not supported. " + HOW_TO_ASK)
    size = len(text.encode("utf-8"))
    if size > max_frame_bytes:
        raise bad_request(f"The frame is {size:,} bytes; the limit is {max_frame_bytes:,} bytes.")
    if not text:
        raise bad_request("The frame is empty. " + HOW_TO_ASK)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        except RecursionError as exc:
            raise bad_request("The message's JSON nests too deeply. " + HOW_TO_ASK) from exc
        except ValueError as exc:  # a number of more digits than Python converts
            raise bad_request("The message's JSON holds a number too long to read.") from exc
        if isinstance(data, dict):
            return _from_object(data, max_question_chars)
    return Question(type="question", message=check_question(text, max_question_chars))


# `seq`s stay far below 10**18, and a longer number is no one's.
MAX_SEQ_DIGITS = 18


def parse_seq(value: str) -> int:
    """The `seq` a client resumes after (`?after=`, `Last-Event-ID`); raises `ValueError`."""
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"'after' must be a whole number, not {value[:32]!r}.")
    if len(value) > MAX_SEQ_DIGITS:
        raise ValueError(
            f"'after' must be a whole number of at most {MAX_SEQ_DIGITS} digits, "
            f"not one of {len(value):,}."
        )
    return int(value)
