"""`/api/webhooks/deliveries`: what became of each webhook event, and redelivery, for admins
(`CHAT_ADMINS`; everyone on a server without sign-in)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from backend.config.settings import Settings
from backend.store.deliveries import DeliveryQueue
from backend.users.auth import Principal
from backend.web.access import Access
from backend.web.http_errors import described
from backend.webhooks.deliverer import Deliverer
from schemas.webhooks import DeliveryList, DeliveryStatus

ADMINS_ONLY = (
    "Only the admins named in CHAT_ADMINS may see or redeliver webhook deliveries "
    "(an API key's user is `key:NAME`)."
)


def build_webhooks_route(
    queue: DeliveryQueue, deliverer: Deliverer | None, settings: Settings, access: Access
) -> APIRouter:
    """The admin's view of webhook deliveries."""
    router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])
    refusals = described({401: "No valid credential", 403: ADMINS_ONLY})

    async def admin(caller: Principal = Depends(access.caller)) -> Principal:  # noqa: B008
        if settings.chat_auth == "none" or caller.user in settings.chat_admins:
            return caller
        raise HTTPException(status.HTTP_403_FORBIDDEN, ADMINS_ONLY)

    @router.get("/deliveries", summary="Webhook deliveries, the latest first", responses=refusals)
    async def deliveries(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        status: DeliveryStatus | None = None,
        endpoint: Annotated[str | None, Query(max_length=64)] = None,
        caller: Principal = Depends(admin),  # noqa: B008
    ) -> DeliveryList:
        rows = await queue.recent(limit, status, endpoint)
        return DeliveryList(deliveries=rows)

    @router.post(
        "/deliveries/{delivery_id}/redeliver",
        status_code=status.HTTP_202_ACCEPTED,
        summary="Attempt a delivery again now, with the same `webhook-id`",
        responses={**refusals, **described({404: "No such delivery"})},
    )
    async def redeliver(
        delivery_id: str,
        caller: Principal = Depends(admin),  # noqa: B008
    ) -> dict[str, str]:
        if len(delivery_id) > 64 or not await queue.redeliver(delivery_id):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"No webhook delivery {delivery_id[:64]!r}."
            )
        if deliverer is not None:
            deliverer.wake()
        return {"redelivered": delivery_id}

    return router
