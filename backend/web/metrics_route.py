"""`GET /metrics`: the server's Prometheus metrics, for whoever may read them.

Reading them needs `Authorization: Bearer $CHAT_METRICS_TOKEN`, or, with no token set, a
client on this machine.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, HTTPException, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST

from backend.config.settings import Settings
from backend.observe.metrics import Metrics
from backend.users.auth import bearer, is_loopback


def client_addresses(request: Request) -> list[str]:
    """Every address a request says it came through: its peer and each forwarding header's.

    uvicorn turns a trusted proxy's `X-Forwarded-For` into the peer, but does not read RFC
    7239's `Forwarded`, so a proxy that sends only that one would make every client look like
    the proxy itself. Reading both, a client counts as local only if no hop says otherwise;
    headers a remote client adds itself can only make it look less local.
    """
    addresses = [request.client.host if request.client is not None else ""]
    for name in ("x-forwarded-for", "x-real-ip"):
        for value in request.headers.getlist(name):
            addresses += [hop.strip() for hop in value.split(",")]
    for value in request.headers.getlist("forwarded"):
        for element in value.split(","):
            for pair in element.split(";"):
                name, _, given = pair.partition("=")
                if name.strip().lower() == "for":
                    addresses.append(forwarded_node(given))
    return addresses


def forwarded_node(node: str) -> str:
    """The address in a `Forwarded: for=` node: unquoted, without its port or IPv6 brackets."""
    node = node.strip().strip('"')
    if node.startswith("["):
        return node[1 : node.find("]")] if "]" in node else node
    return node.rsplit(":", 1)[0] if node.count(":") == 1 else node


def build_metrics_route(metrics: Metrics, settings: Settings) -> APIRouter:
    """`GET /metrics`."""
    router = APIRouter(tags=["operations"])
    secret = settings.chat_metrics_token

    def check(request: Request) -> None:
        if secret is not None:
            given = bearer(request.headers) or ""
            if not hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "Metrics need Authorization: Bearer with CHAT_METRICS_TOKEN.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return
        if not all(is_loopback(address) for address in client_addresses(request)):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                "Metrics are served to this machine only; set CHAT_METRICS_TOKEN to read "
                "them from elsewhere.",
            )

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics_page(request: Request) -> Response:
        check(request)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
