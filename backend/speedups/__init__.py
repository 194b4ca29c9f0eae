"""Measured shortcuts on the token path, each optional: the server is correct without them.

They are kept here, apart, because three of them reach past a library's public API; each says
what it relies on in `PROBES`, checked as the app is made. A shortcut whose library changed
under it is left out (with a warning) and the public path is used, so an upgrade costs speed,
never replies; tests/test_speedups.py fails loudly on the same probes, so an upgrade is
noticed. `CHAT_SPEEDUPS=false` leaves them all out. docs/benchmarks.md has what each saves.

- `eager`: a token is sent from the task that read it (pure Python; no private API).
- `fast_stream`: stream chunks reach LangChain as parsed JSON, past the openai SDK's
  per-chunk objects (`openai.AsyncStream._iter_events`).
- `model_transport`: the model server's connections are asyncio protocols under httpx's pool
  (`httpcore2.AsyncConnectionPool._network_backend`, `httpcore2._backends.base`).
- `memory_rates`: `limits`' memory storage sweeps expired entries once a second instead of
  after every hit (`MemoryStorage._MemoryStorage__schedule_expiry`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import httpcore2
import openai
from limits.aio.storage import MemoryStorage

log = logging.getLogger(__name__)


def _fast_stream() -> str | None:
    events = getattr(openai.AsyncStream, "_iter_events", None)
    if events is None or not inspect.isasyncgenfunction(events):
        return "openai.AsyncStream._iter_events is gone or no longer an async generator"
    if "response" not in inspect.signature(openai.AsyncStream.__init__).parameters:
        return "openai.AsyncStream is no longer made with its `response`"
    return None


def _model_transport() -> str | None:
    try:
        from httpcore2._backends.base import AsyncNetworkBackend, AsyncNetworkStream  # noqa: F401
    except ImportError as missing:
        return f"httpcore2's network backend interface moved: {missing}"
    pool = httpcore2.AsyncConnectionPool()
    if not hasattr(pool, "_network_backend"):
        return "httpcore2.AsyncConnectionPool no longer has `_network_backend`"
    return None


def _memory_rates() -> str | None:
    sweep = getattr(MemoryStorage, "_MemoryStorage__schedule_expiry", None)
    if sweep is None or not inspect.iscoroutinefunction(sweep):
        return "limits' MemoryStorage no longer sweeps in `__schedule_expiry`"
    return None


# Each shortcut that relies on a private API: why it cannot be used, or None if it can.
PROBES: dict[str, Callable[[], str | None]] = {
    "fast_stream": _fast_stream,
    "model_transport": _model_transport,
    "memory_rates": _memory_rates,
}


def usable(name: str, wanted: bool = True) -> bool:
    """Whether the shortcut `name` is to be used: wanted, and its library still as it was."""
    if not wanted:
        return False
    problem = PROBES[name]()
    if problem is not None:
        log.warning("not using the %s speedup: %s", name, problem)
    return problem is None
