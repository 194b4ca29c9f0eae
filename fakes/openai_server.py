"""A fake OpenAI-compatible model server for tests and benchmarks: `python -m fakes.openai_server`.

It speaks just enough HTTP/1.1 for the openai client: `POST .../chat/completions` answered with
real `chat.completion.chunk` Server-Sent Events over chunked transfer encoding, keep-alive
included. Each request follows a `Behaviour` (tokens, delays, failures); each is recorded with
the messages it carried and whether the client hung up before the reply was complete.

It runs on its own event loop in a background thread, so it keeps streaming whatever the code
under test does with its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


def echo_tokens(question: str) -> list[str]:
    """The default reply: the question said back, one word per token."""
    words = f"You said: {question}".split(" ")
    return [words[0], *(f" {word}" for word in words[1:])]


def fake_usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    """The usage the fake reports: a prompt token per word of the messages sent."""
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


@dataclass
class Behaviour:
    """How the fake answers one request."""

    tokens: list[str] | None = None  # None: echo the last user message
    delay: float = 0.0  # seconds before each token
    first_delay: float = 0.0  # extra seconds before the first token
    status: int = 200  # anything else: fail with this status and an OpenAI-style error body
    error_message: str = "fake failure"
    drop_after: int | None = None  # abort the connection after this many tokens
    hang: bool = False  # send the headers, then nothing until the client gives up
    error_after: int | None = None  # after this many tokens, an OpenAI-style error event
    empty: bool = False  # a 200 whose event stream ends at once, with no chunk at all
    stall_after: int | None = None  # after this many tokens, send nothing until it gives up
    repeat: int = 1  # repeat the token list this many times
    # Report usage (when asked, with `stream_options.include_usage`): a prompt token per word
    # of the messages, a completion token per token sent.
    usage: bool = True
    # Append "|SEND_TIME" (time.time(), to the microsecond) to every token as it is written,
    # so a client can tell how long the path after the fake took for each one.
    stamp: bool = False
    # Instead of text, call these tools, (name, arguments) each, the arguments streamed in
    # pieces, as a model does; the request's next answer (with the results) is the next one.
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None


@dataclass
class Recorded:
    """One request as the fake saw it."""

    path: str
    body: dict[str, Any]
    started: float
    tokens_sent: int = 0
    completed: bool = False
    dropped: bool = False  # the fake broke the connection on purpose
    hung_up_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The chat messages of the request."""
        return list(self.body.get("messages", []))

    @property
    def hung_up(self) -> bool:
        """The client closed the connection before the reply was complete."""
        return self.hung_up_at is not None


class FakeUpstream:
    """The server. `start()` it, point `OPENAI_BASE_URL` at `url`, `stop()` it."""

    def __init__(self) -> None:
        self.default = Behaviour()
        self.queued: deque[Behaviour] = deque()
        self.requests: list[Recorded] = []
        self.connections = 0  # TCP connections accepted since the last reset
        self.chooser: Callable[[dict[str, Any]], Behaviour | None] | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL to give an OpenAI client."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control, from any thread ------------------------------------------------------------

    def reset(self) -> None:
        """Forget the recorded requests and go back to the default behaviour."""
        with self._lock:
            self.default = Behaviour()
            self.queued.clear()
            self.requests.clear()
            self.connections = 0
            self.chooser = None

    def then(self, *behaviours: Behaviour) -> None:
        """Use these for the next requests, in order, then the default again."""
        with self._lock:
            self.queued.extend(behaviours)

    async def until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        """Wait, without blocking the caller's event loop, until `condition()` holds.

        It is checked again whenever a request arrives or ends; False after `within` seconds
        raises `TimeoutError`.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while True:
                changed = loop.create_future()
                with self._lock:
                    if condition():
                        return
                    self._watchers.append((loop, changed))
                await changed

    async def arrived(self, count: int, within: float = 5.0) -> list[Recorded]:
        """The requests so far, once at least `count` have arrived."""
        try:
            await self.until(lambda: len(self.requests) >= count, within)
        except TimeoutError:
            raise AssertionError(
                f"expected {count} upstream requests, got {len(self.requests)}"
            ) from None
        return list(self.requests)

    def _changed(self) -> None:
        """Wake every `until` waiting in another thread's loop (from the fake's thread)."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for loop, changed in watchers:
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_settle, changed)

    def start(self) -> FakeUpstream:
        """Serve on a free loopback port in a background thread."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        """Close every connection and the listening socket."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def shutdown() -> None:
            server.close()
            for writer in list(self._connections):
                writer.transport.abort()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    # -- the server side -------------------------------------------------------------------------

    def _next_behaviour(self, body: dict[str, Any]) -> Behaviour:
        with self._lock:
            if self.chooser is not None:
                chosen = self.chooser(body)
                if chosen is not None:
                    return chosen
            return self.queued.popleft() if self.queued else self.default

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        with self._lock:
            self.connections += 1
        try:
            prefix: bytes | None = b""
            while prefix is not None:
                prefix = await self._one_request(reader, writer, prefix)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(writer)
            writer.transport.abort()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: bytes
    ) -> bytes | None:
        """Answer one request; the bytes already read of the next one, or None to close."""
        try:
            head = prefix + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        if method == "GET" and path.endswith("/models"):
            await self._send_json(writer, 200, {"object": "list", "data": [{"id": "fake-model"}]})
            return b""
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send_json(writer, 404, {"error": {"message": f"no route {path}"}})
            return b""
        body = json.loads(raw or b"{}")
        record = Recorded(path=path, body=body, started=time.monotonic())
        with self._lock:
            self.requests.append(record)
        self._changed()
        behaviour = self._next_behaviour(body)
        try:
            return await self._answer(reader, writer, body, behaviour, record)
        finally:
            record.done.set()
            self._changed()

    async def _send_json(self, writer: asyncio.StreamWriter, status: int, data: object) -> None:
        payload = json.dumps(data).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: Behaviour,
        record: Recorded,
    ) -> bytes | None:
        if behaviour.status != 200:
            error = {"message": behaviour.error_message, "type": "fake_error", "code": None}
            await self._send_json(writer, behaviour.status, {"error": error})
            return b""
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        # EOF now means the client is gone. A client never sends while a response streams, but
        # once it is complete it may start the next request: that byte is handed on.
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            finished = await self._stream(writer, body, behaviour, record, hangup)
        except ConnectionError:
            finished = False
        if not finished:
            if not record.dropped:
                record.hung_up_at = time.monotonic()
            return None
        hangup.cancel()
        try:
            early = await hangup
        except asyncio.CancelledError:
            return b""
        return early or None

    async def _stream(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: Behaviour,
        record: Recorded,
        hangup: asyncio.Future[bytes],
    ) -> bool:
        """Stream the reply; False if the client hung up first."""

        async def pause(seconds: float) -> bool:
            """Wait, or return False as soon as the client hangs up."""
            if seconds <= 0:
                return not hangup.done()
            done, _ = await asyncio.wait([hangup], timeout=seconds)
            return not done

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            event = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", "fake-model"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            data = f"data: {json.dumps(event)}\n\n".encode()
            return b"%x\r\n%s\r\n" % (len(data), data)

        if behaviour.hang:
            await hangup
            return False
        if behaviour.empty:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            record.completed = True
            return True
        if behaviour.tool_calls is not None:
            return await self._call_tools(writer, body, behaviour, record, pause, chunk)
        question = next(
            (m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"),
            "",
        )
        tokens = (behaviour.tokens or echo_tokens(str(question))) * behaviour.repeat
        writer.write(chunk({"role": "assistant", "content": ""}))
        if not await pause(behaviour.first_delay):
            return False
        for index, token in enumerate(tokens):
            if behaviour.drop_after is not None and index >= behaviour.drop_after:
                record.dropped = True
                writer.transport.abort()
                return False
            if behaviour.error_after is not None and index >= behaviour.error_after:
                event = {"error": {"message": behaviour.error_message, "type": "fake_error"}}
                data = f"data: {json.dumps(event)}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
                await writer.drain()
                record.completed = True
                return True
            if behaviour.stall_after is not None and index >= behaviour.stall_after:
                await writer.drain()
                await hangup
                return False
            if not await pause(behaviour.delay):
                return False
            text = f"{token}|{time.time():.6f}" if behaviour.stamp else token
            writer.write(chunk({"content": text}))
            record.tokens_sent += 1
            if behaviour.delay > 0 or index % 64 == 0:
                await writer.drain()
        writer.write(chunk({}, "stop"))
        if behaviour.usage and (body.get("stream_options") or {}).get("include_usage"):
            writer.write(chunk({}, choices=[], usage=fake_usage(body, len(tokens))))
        data = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        await writer.drain()
        record.completed = True
        return True

    async def _call_tools(
        self,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
        behaviour: Behaviour,
        record: Recorded,
        pause: Callable[[float], Awaitable[bool]],
        chunk: Callable[..., bytes],
    ) -> bool:
        """Answer with tool calls: each call's name, then its arguments in three pieces."""
        calls = behaviour.tool_calls or []
        writer.write(chunk({"role": "assistant", "content": None}))
        if not await pause(behaviour.first_delay):
            return False
        for index, (name, arguments) in enumerate(calls):
            call_id = f"call_{record.started:.0f}_{index}"
            function = {"name": name, "arguments": ""}
            start = {"index": index, "id": call_id, "type": "function", "function": function}
            writer.write(chunk({"tool_calls": [start]}))
            text = json.dumps(arguments)
            third = max(1, len(text) // 3)
            for at in range(0, len(text), third):
                if not await pause(behaviour.delay):
                    return False
                piece = {"index": index, "function": {"arguments": text[at : at + third]}}
                writer.write(chunk({"tool_calls": [piece]}))
                record.tokens_sent += 1
            await writer.drain()
        writer.write(chunk({}, "tool_calls"))
        if behaviour.usage and (body.get("stream_options") or {}).get("include_usage"):
            writer.write(chunk({}, choices=[], usage=fake_usage(body, record.tokens_sent)))
        data = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        await writer.drain()
        record.completed = True
        return True


def _settle(changed: asyncio.Future[None]) -> None:
    if not changed.done():
        changed.set_result(None)


def behaviour_from_question(body: dict[str, Any]) -> Behaviour | None:
    """Read a behaviour from a question of the form
    `bench tokens=N delay=S [first=S] [stamp=1] [tool=NAME] [para=N]`.

    Lets a process that cannot reach the fake's Python objects (a benchmark driving it over
    HTTP) choose each reply's shape. With `tool=NAME` the model first calls that tool (with
    `{"query": "bench"}`), and answers the tokens once it is sent the tool's result. With
    `para=N` a blank line follows every Nth token.
    """
    messages = body.get("messages") or [{}]
    asked = [m for m in messages if m.get("role") == "user"] or [{}]
    words = str(asked[-1].get("content", "")).split()
    if not words or words[0] != "bench":
        return None
    options = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    if "tool" in options and messages[-1].get("role") != "tool":
        return Behaviour(tool_calls=[(options["tool"], {"query": "bench"})])
    tokens = [" tok"] * int(options.get("tokens", "20"))
    paragraph = int(options.get("para", "0"))
    if paragraph:  # a blank line after every `paragraph` tokens, as prose has
        tokens = [
            f"{token}\n\n" if (n + 1) % paragraph == 0 else token for n, token in enumerate(tokens)
        ]
    return Behaviour(
        tokens=tokens,
        delay=float(options.get("delay", "0")),
        first_delay=float(options.get("first", "0")),
        stamp=options.get("stamp") == "1",
    )


def main() -> None:
    """Serve until killed, printing the base URL on the first line of stdout."""
    fake = FakeUpstream()
    fake.chooser = behaviour_from_question
    fake.start()
    print(fake.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
