"""`create_app()`: the FastAPI application and its routes."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import openai
from fastapi import FastAPI, HTTPException, WebSocket, status
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from backend.chat.conversation import Conversation
from backend.chat.conversations import Conversations, UnknownConversation
from backend.chat.relay import LocalRelays, Relays
from backend.cluster.relay import RedisRelays
from backend.cluster.shared import Cluster
from backend.config.settings import Settings
from backend.model.assistants import load_assistants
from backend.model.chain import build_chain
from backend.model.embedded import local_upstream
from backend.model.reply import Replier
from backend.model.upstream import Upstream, remote_upstream
from backend.observe.metrics import Metrics
from backend.protocol.errors import SHARED_STATE_ERRORS, UNREACHABLE
from backend.protocol.inbound import parse_seq
from backend.speedups import usable
from backend.speedups.model_transport import model_transport
from backend.store.deliveries import DeliveryQueue
from backend.store.sql import SqlStore
from backend.users.auth import Authenticator, Principal, Tickets
from backend.web import ai_sdk, http_errors
from backend.web.access import Access
from backend.web.api import build_api, build_assistants_route
from backend.web.background import build_background_router
from backend.web.http_stream import build_router
from backend.web.metrics_route import build_metrics_route
from backend.web.session import ChatSession
from backend.web.webhooks_route import build_webhooks_route
from backend.webhooks.deliverer import Deliverer
from backend.webhooks.events import Webhooks

log = logging.getLogger(__name__)

FRONTEND_DIR = Path(__file__).resolve().parents[2] / "frontend"
STATIC_DIR = FRONTEND_DIR / "static"
# Browser libraries from npm (frontend/package.json), served as self-contained ES modules.
VENDOR_FILES = {
    "markdown-it.mjs": "markdown-it/dist/browser/markdown-it.esm.min.mjs",
    "purify.mjs": "dompurify/dist/purify.es.mjs",
    "highlight.mjs": "@highlightjs/cdn-assets/es/highlight.min.js",
    "highlight-light.css": "@highlightjs/cdn-assets/styles/github.min.css",
    "highlight-dark.css": "@highlightjs/cdn-assets/styles/github-dark.min.css",
}


def parse_after(value: str | None) -> int:
    """The `after` query parameter: the last `seq` a client has; 0 when absent."""
    return 0 if value is None else parse_seq(value)


def make_upstream(settings: Settings) -> Upstream:
    """The model server `settings` select: the embedded one unless told otherwise."""
    return local_upstream(settings) if settings.mode == "local" else remote_upstream(settings)


def choose_relays(settings: Settings) -> Relays:
    """In this process alone, or shared through Redis with the other workers: chosen once."""
    if settings.chat_redis_url:
        return RedisRelays(Cluster(settings.chat_redis_url))
    return LocalRelays()


def create_app(settings: Settings, relays: Relays | None = None) -> FastAPI:
    """The whole application, configured by `settings` (and `relays`, when given, in place
    of those the settings choose)."""
    upstream = make_upstream(settings)
    transport = (
        model_transport(openai.DEFAULT_CONNECTION_LIMITS)
        if usable("model_transport", settings.chat_speedups)
        else None
    )
    http_client = openai.DefaultAsyncHttpxClient(timeout=settings.chat_timeout, transport=transport)
    metrics = Metrics()
    built_in = build_chain(settings, upstream, http_client)
    assistants = load_assistants(settings, built_in.model, built_in)
    replier = Replier(settings, assistants, upstream, metrics)
    relays = relays if relays is not None else choose_relays(settings)
    webhooks = Webhooks(settings.chat_webhooks)
    store = SqlStore(settings.chat_database_url, cut_off=webhooks.for_reply)
    conversations = Conversations(replier, settings, store, relays, webhooks)
    deliveries = DeliveryQueue(store.engine)
    deliverer = Deliverer(deliveries, webhooks, settings, metrics) if webhooks else None
    access = Access(
        Authenticator(settings),
        Tickets(relays.redis),
        conversations.quotas,
        lambda: conversations.draining,
        settings.chat_allowed_origins,
        loopback_only=settings.chat_auth == "none" and not settings.chat_allow_anonymous,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await conversations.start()
        if deliverer is not None:
            conversations.writer.on_deliveries = deliverer.wake
            deliverer.start()
        await upstream.start()
        # Everything made so far (modules, the chain, the app) lives as long as the process:
        # out of the collector's sight, it is not traversed again at every full collection.
        gc.freeze()
        try:
            yield
        finally:
            await upstream.stop()
            await http_client.aclose()
            try:
                if deliverer is not None:
                    await deliverer.close()
            finally:
                await conversations.close()

    app = FastAPI(
        title="Streaming chat server", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.state.conversations = conversations
    http_errors.install(app)
    app.include_router(build_router(replier, conversations, settings, access))
    app.include_router(build_api(conversations, access))
    app.include_router(build_background_router(conversations, settings, access, webhooks))
    app.include_router(build_webhooks_route(deliveries, deliverer, settings, access))
    app.include_router(build_assistants_route(assistants, access))
    app.include_router(ai_sdk.build_router(conversations, settings, access, metrics))
    app.include_router(access.router())
    app.include_router(build_metrics_route(metrics, settings))

    @app.get("/healthz", summary="Service health")
    async def healthz() -> JSONResponse:
        # 503 until replies can work, and again while draining to stop, so load balancers and
        # readiness probes hold traffic.
        report = {**upstream.health(), "auth": settings.chat_auth}
        if conversations.draining:
            report = {**report, "status": "draining"}
        ok = report["status"] == "ok"
        return JSONResponse(
            report, status_code=status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE
        )

    @app.websocket("/chat")
    async def chat(websocket: WebSocket) -> None:
        try:
            principal, slot = await access.socket(websocket)
        except (*http_errors.REFUSALS, *SHARED_STATE_ERRORS) as refused:
            await websocket.send_denial_response(http_errors.denial(refused))
            return
        open_sockets = metrics.connections.labels("websocket")
        open_sockets.inc()
        try:
            await serve(websocket, principal)
        finally:
            open_sockets.dec()
            await slot.release()

    async def serve(websocket: WebSocket, principal: Principal) -> None:
        """Accept the socket, join its conversation and serve it until it closes."""
        await websocket.accept()
        try:
            conversation, after = await joining(websocket, principal)
        except (UnknownConversation, ValueError) as refused_join:
            # Accepted, then closed: a browser sees this code and reason, never an HTTP status.
            await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=str(refused_join))
            return
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot open a conversation: %s", exc)
            await websocket.close(code=status.WS_1013_TRY_AGAIN_LATER, reason=UNREACHABLE)
            return
        await ChatSession(websocket, conversations, settings, principal).run(conversation, after)

    async def joining(websocket: WebSocket, principal: Principal) -> tuple[Conversation, int]:
        """The conversation `?conversation=ID` names (a new one without it, answered by
        `?assistant=NAME`), and `?after=`."""
        params = websocket.query_params
        wanted = params.get("conversation")
        after = parse_after(params.get("after"))
        if after:
            metrics.resumes.inc()
        assistant = params.get("assistant")
        if wanted is None:
            return conversations.new(principal.user, assistant), after
        return await conversations.open(wanted, principal.user, after, assistant), after

    @app.get("/vendor/{name}", include_in_schema=False)
    async def vendor(name: str) -> FileResponse:
        if name not in VENDOR_FILES:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"No vendored file {name!r}.")
        path = FRONTEND_DIR / "node_modules" / VENDOR_FILES[name]
        if not path.is_file():
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"{name} is not installed; run `make install`."
            )
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return FileResponse(path, media_type=kind)

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="frontend")
    return app
