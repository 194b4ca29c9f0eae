"""The one gate every route and socket passes: a page of this site (or none), or HTTP 403; who
the caller is, or HTTP 401.

HTTP requests carry `Authorization: Bearer`. The WebSocket and the SSE/text streams, which a
browser opens without headers of its own, also take `?ticket=` from `POST /api/ws-ticket`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field

from backend.auth import TICKET_TTL, Authenticator, Principal, Tickets, Unauthorized, bearer
from backend.logs import Throttled
from backend.origin import refuse_foreign

log = logging.getLogger(__name__)
refusals = Throttled(log)

CHALLENGE = {"WWW-Authenticate": "Bearer"}


class Ticket(BaseModel):
    """A single-use pass for one WebSocket (or SSE) handshake."""

    ticket: str = Field(description="Pass it as `?ticket=` within `expires_in` seconds, once.")
    expires_in: int
    user: str = Field(description="The user the ticket stands for ('' when auth is off).")


class Access:
    """Authenticates callers for the app's routes."""

    def __init__(
        self, authenticator: Authenticator, tickets: Tickets, allowed_origins: Iterable[str] = ()
    ) -> None:
        self.authenticator = authenticator
        self.tickets = tickets
        self.allowed_origins = list(allowed_origins)

    @property
    def enabled(self) -> bool:
        return self.authenticator.enabled

    async def principal(self, headers: Mapping[str, str], ticket: str | None) -> Principal:
        """The caller a header or a ticket stands for; raises `Unauthorized`."""
        if ticket is not None and self.enabled:
            return await self.tickets.take(ticket)
        return await self.authenticator.principal(bearer(headers))

    async def caller(self, request: Request) -> Principal:
        """FastAPI dependency: the caller of an HTTP request (a bearer header), or 401."""
        return await self._http(request, None)

    async def stream_caller(self, request: Request) -> Principal:
        """FastAPI dependency for the streams a browser opens without headers: a bearer header
        or `?ticket=`, or 401."""
        return await self._http(request, request.query_params.get("ticket"))

    async def _http(self, request: Request, ticket: str | None) -> Principal:
        # Before the credential: another site's page learns nothing, not even whether its
        # visitor is signed in. Browsers attach no bearer token by themselves today, but a
        # cookie or a proxy that adds one would make these routes act in the visitor's name.
        refuse_foreign(request.headers, self.allowed_origins)
        try:
            return await self.principal(request.headers, ticket)
        except Unauthorized as refused:
            refusals.log(
                logging.INFO,
                "unauthorized",
                "refused %s %s: %s",
                request.method,
                request.url.path,
                refused,
            )
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, str(refused), headers=CHALLENGE
            ) from refused

    def router(self) -> APIRouter:
        """`POST /api/ws-ticket`."""
        router = APIRouter(tags=["auth"])

        @router.post("/api/ws-ticket", summary="Trade a bearer token for a one-use socket ticket")
        async def ws_ticket(principal: Principal = Depends(self.caller)) -> Ticket:  # noqa: B008
            return Ticket(
                ticket=await self.tickets.issue(principal),
                expires_in=TICKET_TTL,
                user=principal.user,
            )

        return router
