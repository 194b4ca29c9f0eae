"""A webhook receiver on a loopback port, for tests: it records every call it gets, and
answers each as it is told (a status, after a delay, with headers), in a thread of its own."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks.webhooks import Webhook


def new_secret(seed: bytes = b"k") -> str:
    """A Standard Webhooks secret (`whsec_` and 32 bytes in base64)."""
    return "whsec_" + base64.b64encode((seed * 32)[:32]).decode()


@dataclass(frozen=True)
class Answer:
    """How the receiver answers one call."""

    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Call:
    """One call the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic()

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    def verified(self, secret: str) -> dict[str, Any]:
        """The payload, once the `standardwebhooks` library has checked its signature."""
        payload: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return payload


class Receiver:
    """`start()` it, register `url(path)` as an endpoint, read `calls`, `stop()` it."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.answers: deque[Answer] = deque()
        self.default = Answer()
        self.in_flight = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                answer = receiver._next(Call(self.path, headers, body, time.monotonic()))
                if answer.delay:
                    with receiver._lock:
                        receiver.in_flight += 1
                    time.sleep(answer.delay)
                    with receiver._lock:
                        receiver.in_flight -= 1
                try:
                    self.send_response(answer.status)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def then(self, *answers: Answer) -> None:
        """Answer the next calls so, in order; then as `default`."""
        with self._lock:
            self.answers.extend(answers)

    def _next(self, call: Call) -> Answer:
        with self._lock:
            self.calls.append(call)
            return self.answers.popleft() if self.answers else self.default

    async def until(self, count: int, within: float) -> list[Call]:
        """The calls, once there are at least `count`; fails after `within` seconds."""
        async with asyncio.timeout(within):
            while len(self.calls) < count:  # noqa: ASYNC110 - a thread's list has no event
                await asyncio.sleep(0.01)
        return list(self.calls)
