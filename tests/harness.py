"""Running the real app on a loopback port, and talking to it like a client would."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from backend.chat.relay import Relays
from backend.config.settings import Settings
from backend.process.server import bind, chat_server
from backend.web.app import create_app
from deploy.services import Addressed, environment_without_settings
from fakes.openai_server import FakeUpstream

# Every wait in the tests is a multiple of this, so a slow machine needs one change.
UNIT = 2.0

Frame = dict[str, Any]
SettingsFactory = Callable[..., Settings]


_DATA = tempfile.TemporaryDirectory(prefix="chat-tests-")


def temp_database() -> str:
    """The URL of a new, empty SQLite database in a folder removed when the tests end."""
    folder = tempfile.mkdtemp(dir=_DATA.name)
    return f"sqlite+aiosqlite:///{folder}/chat.db"


class IsolatedSettings(Settings):
    """Settings from keyword arguments only: the environment and `.env` are ignored.

    Each instance has a database of its own unless one is given.
    """

    chat_database_url: str = Field(default_factory=temp_database)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class LiveServer(Addressed):
    """The app under uvicorn in a thread of its own, on a free loopback port."""

    def __init__(self, settings: Settings, port: int = 0, relays: Relays | None = None) -> None:
        self.settings = settings
        self.sock = bind("127.0.0.1", port)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(settings, relays)
        self.server = chat_server(self.app, settings, "127.0.0.1", self.port)
        self.server.config.log_level = "warning"
        self.thread = threading.Thread(target=self._run, name="app-server", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = UNIT * 5
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the app server failed to start")
            threading.Event().wait(0.01)
            waited += 0.01
            if waited > deadline:
                raise RuntimeError("the app server did not start in time")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(UNIT * 5)
        self.sock.close()


@contextmanager
def live_server(
    settings: Settings, port: int = 0, relays: Relays | None = None
) -> Iterator[LiveServer]:
    """Serve `settings`' app for the duration of the block (on `port`, or a free one; with
    `relays` in place of those the settings choose)."""
    server = LiveServer(settings, port, relays).start()
    try:
        yield server
    finally:
        server.stop()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has finished running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def wait_gone(pid: int, within: float = UNIT * 5) -> None:
    """Return once `pid` no longer runs; fails after `within` seconds."""
    async with asyncio.timeout(within):
        while alive(pid):  # noqa: ASYNC110 - another process's exit has no event to await
            await asyncio.sleep(0.02)


@asynccontextmanager
async def python_process(*args: str, **options: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python ARGS...` for the duration of the block; killed if still running at its end."""
    process = await asyncio.create_subprocess_exec(sys.executable, *args, **options)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def healthy(base: str, within: float = UNIT * 10) -> None:
    """Return once `base`/healthz answers 200; fails after `within` seconds."""
    async with httpx.AsyncClient(timeout=UNIT) as client, asyncio.timeout(within):
        while True:
            try:
                if (await client.get(f"{base}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


@asynccontextmanager
async def backend_process(
    port: int, *args: str, **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m backend --port PORT ARGS...` with none of the caller's model or chat settings:
    only `env`, and a database of its own unless `env` names one."""
    environment = environment_without_settings()
    environment["CHAT_DATABASE_URL"] = temp_database()
    environment.update(env)
    async with python_process(
        "-m",
        "backend",
        "--port",
        str(port),
        *args,
        env=environment,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    ) as process:
        yield process


async def signal_leaves_no_orphan(
    parent: asyncio.subprocess.Process, sig: signal.Signals, child: int
) -> None:
    """Send `sig` to `parent`; it must exit, and its child `child` must not outlive it."""
    assert alive(child)
    parent.send_signal(sig)
    async with asyncio.timeout(UNIT * 5):
        await parent.wait()
    await wait_gone(child)


async def wait_hung_up(fake: FakeUpstream, index: int, within: float = 1.0) -> float:
    """Seconds until upstream request `index` saw its client hang up; fails after `within`."""
    record = (await fake.arrived(index + 1))[index]
    try:
        await fake.until(lambda: record.hung_up_at is not None, within)
    except TimeoutError:
        raise AssertionError("the upstream request was never closed") from None
    assert record.hung_up_at is not None
    return record.hung_up_at - record.started


@asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[ClientConnection]:
    """A socket to `url` whose opening `info` frame (the conversation id) is already read.

    The id is in `conversation_of(ws)`.
    """
    async with ws_connect(url, **options) as ws:
        hello = await recv(ws)
        assert hello["type"] == "info", hello
        assert "seq" not in hello, hello
        _CONVERSATIONS[ws] = hello["conversation"]
        yield ws


_CONVERSATIONS: weakref.WeakKeyDictionary[ClientConnection, str] = weakref.WeakKeyDictionary()


def conversation_of(ws: ClientConnection) -> str:
    """The id of the conversation `ws` opened in."""
    return _CONVERSATIONS[ws]


async def recv(ws: ClientConnection, within: float = UNIT) -> Frame:
    """The next frame, parsed; fails the test rather than hang."""
    async with asyncio.timeout(within):
        raw = await ws.recv()
    frame = json.loads(raw)
    assert isinstance(frame, dict), raw
    return frame


async def until_reply_text(ws: ClientConnection) -> Frame:
    """Read up to the first frame of reply text (the model is answering by then)."""
    while True:
        frame = await recv(ws)
        if frame["type"] == "stream" and frame["sender"] == "bot":
            return frame


async def until_end(ws: ClientConnection, within: float = UNIT * 5) -> list[Frame]:
    """Frames up to and including the next bot `end`."""
    frames: list[Frame] = []
    async with asyncio.timeout(within):
        while True:
            frame = await recv(ws, within)
            frames.append(frame)
            if frame["type"] == "end":
                return frames


async def ask(ws: ClientConnection, question: str) -> list[Frame]:
    """Send a question and collect its frames, echo to `end`."""
    await ws.send(json.dumps({"type": "question", "message": question}))
    return await until_end(ws)


async def close_of(ws: ClientConnection, within: float = UNIT * 2) -> tuple[int, str]:
    """Read until the server closes `ws`; its close code and reason."""
    try:
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        received = closed.rcvd
    if received is None:
        raise AssertionError("closed without a close frame from the server")
    return received.code, received.reason


def bare(frame: Frame) -> Frame:
    """`frame` without its `seq` and `timings` (which differ from run to run), to compare with
    what a frame says."""
    return {key: value for key, value in frame.items() if key not in ("seq", "timings")}


def text_of(frames: list[Frame]) -> str:
    """The bot text streamed in `frames`."""
    return "".join(f["message"] for f in frames if f["type"] == "stream" and f["sender"] == "bot")


def kinds(frames: list[Frame]) -> list[str]:
    """Frame types in order, with consecutive bot `stream` frames folded into one."""
    out: list[str] = []
    for frame in frames:
        kind = frame["type"] if frame["sender"] == "bot" else f"you:{frame['type']}"
        if not (kind == "stream" and out and out[-1] == "stream"):
            out.append(kind)
    return out


# Raw sockets, for what a client library would not send: an attacker's requests.
UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


async def raw_exchange(port: int, request: bytes, within: float = UNIT) -> bytes:
    """Everything the server sends back to `request` until it closes the connection.

    Fails if the connection is still open after `within` seconds: silence holds a descriptor.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(within):
            return await reader.read(-1)
    except TimeoutError:
        raise AssertionError(f"no answer and no close within {within} s") from None
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def handshake(path: str, extra_headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{UPGRADE}{extra_headers}\r\n".encode(
        "latin-1"
    )
