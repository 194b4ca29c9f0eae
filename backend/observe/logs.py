"""The server's log: readable text by default, one JSON object per line with
`CHAT_LOG_FORMAT=json`, and on every line written for a conversation or a reply, their ids.

The ids travel in context variables: a socket's task sets the conversation, a reply's task the
reply, and every task started from there (and every log line written in it) inherits them.
Request lines never show a query string, where a question (`/stream?prompt=...`) would be.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar

from backend.config.settings import LogFormat

conversation_id: ContextVar[str | None] = ContextVar("conversation_id", default=None)
reply_id: ContextVar[str | None] = ContextVar("reply_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(ids)s %(message)s"
# Loud at INFO but of no use to an operator: one line per request to the model server.
QUIET = ("httpx", "httpx2")


class WithIds(logging.Filter):
    """Puts the conversation and reply ids in force on every record (`ids`, for text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = {"conversation": conversation_id.get(), "reply": reply_id.get()}
        record.__dict__.update(ids)
        named = " ".join(f"{name}={value}" for name, value in ids.items() if value)
        record.ids = f" [{named}]" if named else ""
        return True


class NoQueryStrings(logging.Filter):
    """uvicorn's request lines without their query strings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                arg.split("?", 1)[0] if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, and a traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("conversation", "reply"):
            value = getattr(record, name, None)
            if value:
                line[name] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(format: LogFormat) -> None:
    """Send every logger's lines (uvicorn's too) to stderr in `format`."""
    handler = logging.StreamHandler()
    handler.addFilter(WithIds())
    handler.addFilter(NoQueryStrings())
    handler.setFormatter(JsonLines() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


class Throttled:
    """Writes a line that may repeat at will (a refusal anyone can provoke) at most once per
    `every` seconds for each kind, saying how many like it were left out meanwhile."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        # kind -> (when its last line was written, lines left out since)
        self.seen: dict[str, tuple[float, int]] = {}

    def log(self, level: int, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, left_out = self.seen.get(kind, (-self.every, 0))
        if now - last < self.every:
            self.seen[kind] = (last, left_out + 1)
            return
        self.seen[kind] = (now, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {self.every:.0f} s)"
        self.logger.log(level, message, *args)
