"""How the app is served by uvicorn; shared by `python -m backend`, the tests and the benchmarks."""

from __future__ import annotations

import logging
import socket

import uvicorn
from fastapi import FastAPI

from backend.config.settings import Settings
from backend.config.timings import GRACEFUL_SHUTDOWN_TIMEOUT
from backend.process.protocols import WebSocketProtocol, http_protocol


def uvicorn_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The uvicorn settings the app relies on: its WebSocket frame limit among them."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=http_protocol(settings.chat_request_timeout),
        ws=WebSocketProtocol,
        ws_max_size=settings.ws_max_size,
        log_level="info",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT,
    )


class ChatServer(uvicorn.Server):
    """uvicorn, draining the app's conversations before it shuts down.

    While draining the port stays open, so `/healthz` can say so; new sockets are refused.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await self.app.state.conversations.drain(self.grace)
        except Exception:
            logging.getLogger(__name__).exception("draining conversations failed")
        await super().shutdown(sockets)


def chat_server(app: FastAPI, settings: Settings, host: str, port: int) -> ChatServer:
    """The server for `app`, configured by `settings`."""
    return ChatServer(uvicorn_config(app, settings, host, port), app, settings.chat_shutdown_grace)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock
