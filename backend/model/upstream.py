"""The model server the chain talks to: OpenAI, an OpenAI-compatible server, or the embedded one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backend.config.settings import OPENAI_URL, Mode, Settings
from backend.model.history import ContextWindow
from backend.protocol.errors import ChatError

Notify = Callable[[str], None]


class Upstream:
    """An OpenAI-compatible server that is simply there (OpenAI, vLLM, Ollama, llama.cpp...)."""

    def __init__(self, mode: Mode, url: str, model: str, reply_tokens: int | None = None) -> None:
        self.mode: Mode = mode
        self.url = url.rstrip("/")
        self.model = model
        # Longest reply asked of the model; None leaves it to the model server.
        self.reply_tokens = reply_tokens
        # Set when the model's context size and tokenizer are known, so history can be fitted.
        self.context: ContextWindow | None = None

    async def start(self) -> None:
        """Begin whatever must run before replies can work; returns without waiting for it."""

    async def stop(self) -> None:
        """Release what `start` began."""

    async def ensure_ready(self, notify: Notify) -> None:
        """Return once a request can be sent, or raise a `ChatError` saying why it cannot."""

    async def explain_failure(self, exc: BaseException) -> ChatError | None:
        """A better account of the failed request than `exc` gives, when one is known."""
        return None

    def health(self) -> dict[str, Any]:
        """What `/healthz` reports about this upstream."""
        return {"status": "ok", "mode": self.mode, "model": self.model, "upstream": self.url}


class MissingUpstream(Upstream):
    """No model server at all: every question gets a `not_configured` error naming the fix."""

    def __init__(self, reason: str) -> None:
        super().__init__("local", "", "")
        self.error = ChatError(
            "not_configured",
            f"No model is available: {reason} Set OPENAI_API_KEY to use OpenAI, or "
            "OPENAI_BASE_URL to use an OpenAI-compatible server (vLLM, Ollama, llama.cpp).",
        )

    async def ensure_ready(self, notify: Notify) -> None:
        raise self.error

    def health(self) -> dict[str, Any]:
        return {**super().health(), "status": "unconfigured", "detail": self.error.message}


def remote_upstream(settings: Settings) -> Upstream:
    """The upstream named by OPENAI_BASE_URL, or OpenAI itself."""
    return Upstream(
        settings.mode,
        settings.openai_base_url or OPENAI_URL,
        settings.chat_model,
        settings.chat_max_reply_tokens,
    )
