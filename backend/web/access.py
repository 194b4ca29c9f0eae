"""The one gate every route and socket passes, in one order: a page of this site (or none),
a server that is not draining, a known caller, and a free connection slot.

Each check refuses by raising (`ForeignOrigin`, `Draining`, `Unauthorized`, `RateLimited`);
backend/web/http_errors.py turns them into responses, the same for every route and handshake.

HTTP requests carry `Authorization: Bearer`. The WebSocket and the SSE/text streams, which a
browser opens without headers of its own, also take `?ticket=` from `POST /api/ws-ticket`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.datastructures import Address
from starlette.websockets import WebSocket

from backend.protocol.errors import Draining
from backend.users.auth import TICKET_TTL, Authenticator, Principal, Tickets, bearer
from backend.users.quotas import Quotas, quota_key
from backend.web.origin import ForeignOrigin, host_refusal, refuse_foreign


class Ticket(BaseModel):
    """A single-use pass for one WebSocket (or SSE) handshake."""

    ticket: str = Field(description="Pass it as `?ticket=` within `expires_in` seconds, once.")
    expires_in: int
    user: str = Field(description="The user the ticket stands for ('' when auth is off).")


@dataclass
class Slot:
    """One of the caller's connections (a socket or a stream), counted by its quota."""

    quotas: Quotas
    who: str
    holder: str | None
    released: bool = False

    async def release(self) -> None:
        """Give the slot back; only the first call does."""
        if not self.released:
            self.released = True
            await self.quotas.close_connection(self.who, self.holder)


class Access:
    """Admits callers to the app's routes and sockets."""

    def __init__(
        self,
        authenticator: Authenticator,
        tickets: Tickets,
        quotas: Quotas,
        draining: Callable[[], bool],
        allowed_origins: Iterable[str] = (),
        loopback_only: bool = False,
    ) -> None:
        self.authenticator = authenticator
        self.tickets = tickets
        self.quotas = quotas
        self.draining = draining
        self.allowed_origins = list(allowed_origins)
        # No sign-in and no other guard: the only callers are this machine's (see host_refusal).
        self.loopback_only = loopback_only

    @property
    def enabled(self) -> bool:
        return self.authenticator.enabled

    async def principal(self, headers: Mapping[str, str], ticket: str | None) -> Principal:
        """The caller a header or a ticket stands for; raises `Unauthorized`."""
        if ticket is not None and self.enabled:
            return await self.tickets.take(ticket)
        return await self.authenticator.principal(bearer(headers))

    async def caller(self, request: Request) -> Principal:
        """FastAPI dependency: the caller of an HTTP request (a bearer header)."""
        return await self._http(request, None)

    async def stream_caller(self, request: Request) -> Principal:
        """FastAPI dependency for the streams a browser opens without headers: a bearer header
        or `?ticket=`."""
        return await self._http(request, request.query_params.get("ticket"))

    async def _http(self, request: Request, ticket: str | None) -> Principal:
        # Before the credential: another site's page learns nothing, not even whether its
        # visitor is signed in. Browsers attach no bearer token by themselves today, but a
        # cookie or a proxy that adds one would make these routes act in the visitor's name.
        self._refuse_foreign(request.headers)
        return await self.principal(request.headers, ticket)

    def _refuse_foreign(self, headers: Mapping[str, str]) -> None:
        refuse_foreign(headers, self.allowed_origins)
        if self.loopback_only:
            refused = host_refusal(headers, self.allowed_origins)
            if refused is not None:
                raise ForeignOrigin(refused)

    def ensure_open(self) -> None:
        """Raise `Draining` once the server is stopping: nothing new starts then."""
        if self.draining():
            raise Draining()

    async def slot(self, caller: Principal, client: Address | None) -> Slot:
        """A connection slot of the caller's (or `RateLimited`), taken before any work."""
        who = quota_key(caller, client)
        return Slot(self.quotas, who, await self.quotas.open_connection(who))

    async def socket(self, websocket: WebSocket) -> tuple[Principal, Slot]:
        """Admit a WebSocket handshake: its caller and the slot its socket holds."""
        self._refuse_foreign(websocket.headers)
        self.ensure_open()
        principal = await self.principal(websocket.headers, websocket.query_params.get("ticket"))
        return principal, await self.slot(principal, websocket.client)

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
