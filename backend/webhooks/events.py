"""The webhook events a reply's end or a conversation's deletion makes, one per endpoint that
hears of it: an endpoint the question named, or one that hears of every conversation.

Each event is made as a `DeliveryRecord`, stored in the same transaction as what it tells of
(see backend/store/sql.py), with an id made from that, so it is stored once however often the
same end is saved, and the same `webhook-id` goes with every attempt to deliver it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime

from backend.config.webhook_endpoints import WebhookEndpoint
from backend.store.records import DeliveryRecord, TurnRecord, now
from schemas.frames import Timings
from schemas.webhooks import (
    REPLY_EVENTS,
    DeletedData,
    DeletedEvent,
    ErrorInfo,
    ReplyData,
    ReplyEvent,
    SeqRange,
    WebhookEventType,
)

NO_TIMINGS = Timings(first_token_seconds=None, duration_seconds=None)


class UnknownWebhook(ValueError):
    """A question named an endpoint that is not registered."""


def delivery_id(subject: str, endpoint: str) -> str:
    """The `webhook-id` of the event about `subject` for `endpoint`."""
    return "msg_" + hashlib.sha256(f"{subject}\n{endpoint}".encode()).hexdigest()[:32]


class Webhooks:
    """The registered endpoints (`CHAT_WEBHOOKS`), and the events made for them."""

    def __init__(self, endpoints: Iterable[WebhookEndpoint]) -> None:
        self.endpoints = {endpoint.name: endpoint for endpoint in endpoints}

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def check(self, name: str | None) -> None:
        """Raise `UnknownWebhook` unless `name` is None or a registered endpoint."""
        if name is None or name in self.endpoints:
            return
        raise UnknownWebhook(
            f"No webhook endpoint {name[:64]!r} is registered on this server (CHAT_WEBHOOKS)."
        )

    def _hearing(self, event: WebhookEventType, named: Iterable[str | None]) -> list[str]:
        wanted = set(named)
        return [
            endpoint.name
            for endpoint in self.endpoints.values()
            if event in endpoint.events and (endpoint.every_conversation or endpoint.name in wanted)
        ]

    def for_reply(
        self,
        conversation_id: str,
        owner: str,
        assistant: str | None,
        turn: TurnRecord,
    ) -> list[DeliveryRecord]:
        """The events of a reply that has just ended (`turn.status` is set)."""
        if not self.endpoints or turn.status is None:
            return []
        event = REPLY_EVENTS[turn.status]
        targets = self._hearing(event, [turn.webhook])
        if not targets:
            return []
        failure = next((frame for frame in reversed(turn.events) if frame.type == "error"), None)
        ended = turn.events[-1] if turn.events else None
        moment = now()
        body = ReplyEvent(
            type=event,
            timestamp=moment,
            data=ReplyData(
                conversation=conversation_id,
                user=owner,
                assistant=assistant,
                turn=turn.position,
                question=turn.question,
                seq=SeqRange(first=turn.first_seq, last=turn.last_seq),
                status=turn.status,
                text=turn.text,
                error=(
                    ErrorInfo(code=failure.code, message=failure.message)
                    if failure is not None and failure.code is not None
                    else None
                ),
                usage=ended.usage if ended is not None else None,
                timings=(ended.timings if ended is not None else None) or NO_TIMINGS,
            ),
        ).model_dump_json()
        subject = f"reply {conversation_id} {turn.first_seq} {turn.asked_at.isoformat()}"
        return self._records(subject, targets, event, conversation_id, owner, body, moment)

    def for_deletion(
        self, conversation_id: str, owner: str, named: Iterable[str | None]
    ) -> list[DeliveryRecord]:
        """The events of a conversation being deleted, for the endpoints its questions named
        and those that hear of every conversation."""
        if not self.endpoints:
            return []
        targets = self._hearing("conversation.deleted", named)
        if not targets:
            return []
        moment = now()
        body = DeletedEvent(
            type="conversation.deleted",
            timestamp=moment,
            data=DeletedData(conversation=conversation_id, user=owner),
        ).model_dump_json()
        subject = f"deleted {conversation_id} {moment.isoformat()}"
        return self._records(
            subject, targets, "conversation.deleted", conversation_id, owner, body, moment
        )

    @staticmethod
    def _records(
        subject: str,
        targets: list[str],
        event: str,
        conversation_id: str,
        owner: str,
        body: str,
        moment: datetime,
    ) -> list[DeliveryRecord]:
        return [
            DeliveryRecord(
                id=delivery_id(subject, name),
                endpoint=name,
                event=event,
                conversation_id=conversation_id,
                owner=owner,
                payload=body,
                created_at=moment,
            )
            for name in targets
        ]
