"""`create_app()`: the FastAPI application and its routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from backend.chain import build_chain
from backend.config import Settings
from backend.http_stream import build_router
from backend.origin import origin_allowed
from backend.reply import NOT_CONFIGURED, Replier
from backend.session import ChatSession

log = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parent.parent / "frontend"


def health(settings: Settings) -> dict[str, Any]:
    """What `/healthz` reports: whether replies can work, and against which upstream."""
    report: dict[str, Any] = {
        "status": "ok",
        "mode": settings.mode,
        "model": settings.chat_model,
        "upstream": settings.upstream_url,
    }
    if settings.mode == "none":
        report["status"] = "unconfigured"
        report["detail"] = NOT_CONFIGURED.message
    return report


def create_app(settings: Settings) -> FastAPI:
    """The whole application, configured by `settings`."""
    http_client = openai.DefaultAsyncHttpxClient(timeout=settings.chat_timeout)
    chain = build_chain(settings, http_client) if settings.mode != "none" else None
    replier = Replier(settings, chain)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await http_client.aclose()

    app = FastAPI(
        title="Streaming chat server", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.include_router(build_router(replier))

    @app.get("/healthz", summary="Service health")
    async def healthz() -> JSONResponse:
        report = health(settings)
        return JSONResponse(report, status_code=200)

    @app.websocket("/chat")
    async def chat(websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if not origin_allowed(origin, websocket.headers.get("host"), settings.chat_allowed_origins):
            log.warning("refused a socket from origin %s", origin)
            await websocket.send_denial_response(
                PlainTextResponse(
                    f"Origin {origin} is not allowed. Add it to CHAT_ALLOWED_ORIGINS.",
                    status_code=403,
                )
            )
            return
        await websocket.accept()
        await ChatSession(websocket, replier, settings).run()

    if FRONTEND_DIR.is_dir():
        app.mount("/", StaticFiles(directory=FRONTEND_DIR, html=True), name="frontend")
    return app
