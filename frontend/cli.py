"""The terminal client: `python -m frontend.cli [ws://HOST:PORT/chat]`.

Reads questions from standard input, one per line, and streams each reply's text to standard
output as it arrives (`info` and `error` frames go to standard error). Ctrl-C during a reply
stops it; Ctrl-C at the prompt, or end of input, quits. `/reset` starts the conversation over.
Piped input works: every line is asked in turn, and the client exits after the last reply.
A server with `CHAT_AUTH=token` wants `--token TOKEN` (or `CHAT_TOKEN`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

DEFAULT_URL = "ws://127.0.0.1:8000/chat"
PROMPT = "you> "
EXIT_UNREACHABLE = 2
EXIT_CONNECTION_LOST = 1
EXIT_UNAUTHORIZED = 3
UNAUTHORIZED = 401


def read_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
    """In a thread: hand each line of standard input to the loop, then None at its end."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    loop.call_soon_threadsafe(queue.put_nowait, None)


class Terminal:
    """One connection's conversation, shown on a terminal."""

    def __init__(
        self, ws: ClientConnection, url: str, out: TextIO, err: TextIO, interactive: bool
    ) -> None:
        self.ws = ws
        self.url = url
        self.out = out
        self.err = err
        self.interactive = interactive
        self.replying = False
        # The question sent and not said back yet: an `end` before it is not its reply's (a
        # turn replayed to a client that joined a conversation).
        self.asked: str | None = None
        self.reply_done = asyncio.Event()
        self.reply_done.set()
        self.quit = asyncio.Event()
        self.pending: set[asyncio.Future[None]] = set()

    def prompt(self) -> None:
        if self.interactive:
            self.err.write(PROMPT)
            self.err.flush()

    def show(self, frame: dict[str, Any]) -> None:
        """Render one frame."""
        kind, message = frame.get("type"), frame.get("message", "")
        if kind == "stream" and frame.get("sender") == "bot":
            self.out.write(message)
            self.out.flush()
        elif kind == "stream" and self.asked is not None and message.strip() == self.asked.strip():
            self.asked = None  # the question said back: its reply follows
        elif kind == "info":
            self.err.write(f"[{message}]\n")
            if frame.get("conversation"):
                joining = f"{self.url.split('?')[0]}?conversation={frame['conversation']}"
                self.err.write(f"[to come back to it: {joining}]\n")
        elif kind == "error":
            self.err.write(f"error: {message}\n")
            if self.asked is not None and frame.get("seq") is None:  # the question was refused
                self.done()
        elif kind == "end":
            self.out.write("\n")
            self.out.flush()
            if frame.get("status") == "interrupted":
                self.err.write("[stopped]\n")
            if self.asked is None:
                self.done()
        self.err.flush()

    def done(self) -> None:
        """The reply to the question asked is over (or the question was refused)."""
        self.asked = None
        self.replying = False
        self.reply_done.set()

    async def receive(self) -> None:
        async for raw in self.ws:
            self.show(json.loads(raw))

    def interrupt(self) -> None:
        """Ctrl-C: stop the reply in progress, or quit at the prompt."""
        if self.replying:
            sending = asyncio.ensure_future(self.ws.send(json.dumps({"type": "stop"})))
            self.pending.add(sending)
            sending.add_done_callback(self.pending.discard)
        else:
            self.err.write("\n")
            self.quit.set()

    async def converse(self, lines: asyncio.Queue[str | None]) -> None:
        """Ask each line in turn, waiting for each reply to end."""
        while True:
            self.prompt()
            line = await lines.get()
            if line is None:
                return
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                await self.ws.send(json.dumps({"type": "reset"}))
                continue
            self.replying, self.asked = True, line
            self.reply_done.clear()
            await self.ws.send(json.dumps({"type": "question", "message": line}))
            await self.reply_done.wait()


async def run(url: str, token: str | None = None) -> int:
    """Talk to the server at `url` until input ends or the user quits; the exit status."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await connect(url, open_timeout=10, additional_headers=headers)
    except InvalidStatus as refused:
        if refused.response.status_code == UNAUTHORIZED:
            hint = "pass --token or set CHAT_TOKEN" if not token else "the token was refused"
            print(f"The chat server at {url} wants a valid token: {hint}.", file=sys.stderr)
            return EXIT_UNAUTHORIZED
        print(f"Cannot reach the chat server at {url}: {refused}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        print(f"Cannot reach the chat server at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=read_lines, args=(loop, lines), daemon=True).start()
    terminal = Terminal(ws, url, sys.stdout, sys.stderr, interactive=sys.stdin.isatty())
    loop.add_signal_handler(signal.SIGINT, terminal.interrupt)
    receiver = asyncio.create_task(terminal.receive())
    conversation = asyncio.create_task(terminal.converse(lines))
    quitting = asyncio.create_task(terminal.quit.wait())
    try:
        done, _ = await asyncio.wait(
            [receiver, conversation, quitting], return_when=asyncio.FIRST_COMPLETED
        )
        if receiver in done:
            error = receiver.exception()
            reason = error if isinstance(error, ConnectionClosed) else "closed by the server"
            print(f"\nThe connection to {url} was lost: {reason}", file=sys.stderr)
            return EXIT_CONNECTION_LOST
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in (receiver, conversation, quitting):
            task.cancel()
        with contextlib.suppress(Exception):
            await ws.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m frontend.cli", description=__doc__)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    parser.add_argument(
        "--token",
        default=os.environ.get("CHAT_TOKEN"),
        help="bearer token (a JWT or an API key) for a server with CHAT_AUTH=token; "
        "default $CHAT_TOKEN",
    )
    args = parser.parse_args(argv)
    sys.exit(asyncio.run(run(args.url, args.token)))


if __name__ == "__main__":
    main()
