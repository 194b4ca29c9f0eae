"""Delivering stored webhook events: one loop per worker, off every reply's path.

The loop claims the deliveries that are due (one worker at a time has each, see
backend/store/deliveries.py), attempts each in a task of its own, at most `concurrency` at
once, each within the timeout, and stores how it went: delivered; due again after a backoff
that doubles from `first_retry` (at most an hour, with jitter, never sooner than the receiver's
`Retry-After`); or failed, once the retry period since the event has passed or the receiver's
answer shows retrying cannot help. It sleeps until the next delivery is due, or until it is
woken: by new events being stored, or by an admin asking for a redelivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from backend.config.settings import Settings
from backend.observe.metrics import Metrics
from backend.store.deliveries import Claimed, DeliveryQueue
from backend.store.records import now
from backend.webhooks.events import Webhooks
from backend.webhooks.sending import Outcome, Sender

log = logging.getLogger(__name__)

LONGEST_BACKOFF = 3600.0
JITTER = 0.2  # each backoff is drawn within this fraction either side
# Seconds between looks at the store when nothing is due: deliveries another worker stored,
# or claimed and never finished (it died), are found this late at worst.
IDLE_LOOK = 5.0
# Seconds a claim outlives the attempt's timeout (time to record how it went), before another
# worker may take it over: how late, at worst, a delivery whose worker died mid-attempt is
# attempted again.
CLAIM_MARGIN = 5.0
STORE_RETRY = 1.0
# Seconds between deletions of the deliveries kept long enough (as a worker starts, then
# about this often): in batches, until none is left.
PRUNE_EVERY = 600.0
PRUNE_BATCH = 1000


def backoff(attempts: int, first: float) -> float:
    """Seconds before the next attempt, after `attempts` failed ones."""
    base = min(LONGEST_BACKOFF, first * 2 ** (attempts - 1))
    return float(base * random.uniform(1 - JITTER, 1 + JITTER))


class Deliverer:
    """Claims and attempts the deliveries that are due, until closed."""

    def __init__(
        self, queue: DeliveryQueue, webhooks: Webhooks, settings: Settings, metrics: Metrics
    ) -> None:
        self.queue = queue
        self.webhooks = webhooks
        self.metrics = metrics
        self.concurrency = settings.chat_webhook_concurrency
        self.first_retry = settings.chat_webhook_first_retry
        self.retry_for = settings.chat_webhook_retry_for
        self.keep_for = settings.chat_webhook_keep_for
        self.lease = settings.chat_webhook_timeout + CLAIM_MARGIN
        self.sender = Sender(
            settings.chat_webhook_timeout,
            settings.chat_webhook_concurrency,
            settings.chat_webhook_allow_private,
        )
        self._wake = asyncio.Event()
        # Attempts in flight, and the delivery each is for.
        self._attempts: dict[asyncio.Task[None], str] = {}
        self._loop: asyncio.Task[None] | None = None
        self._pruning: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="webhook-deliverer")
        self._pruning = asyncio.create_task(self._prune(), name="webhook-pruning")

    def wake(self) -> None:
        """Look for due deliveries now (new ones were stored, or one was redelivered)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop claiming; attempts in flight are cancelled and their claims given back, so
        another worker (or this one, restarted) attempts them again."""
        for task in (self._loop, self._pruning):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        cancelled = dict(self._attempts)
        for attempt in cancelled:
            attempt.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        try:
            await self.queue.release(list(cancelled.values()))
        except (SQLAlchemyError, OSError) as failed:
            log.warning("could not give back webhook claims (they run out): %s", failed)
        await self.sender.close()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            room = self.concurrency - len(self._attempts)
            if room <= 0:
                await asyncio.wait(self._attempts, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                claimed = await self.queue.claim(room, self.lease)
            except (SQLAlchemyError, OSError) as failed:
                log.warning("could not claim webhook deliveries: %s; will retry", failed)
                await asyncio.sleep(STORE_RETRY)
                continue
            for delivery in claimed:
                task = asyncio.create_task(self._attempt(delivery), name=f"webhook-{delivery.id}")
                self._attempts[task] = delivery.id
                task.add_done_callback(self._forget)
            if len(claimed) == room:
                continue  # there may be more due
            await self._sleep()

    async def _prune(self) -> None:
        """Delete the finished deliveries kept long enough, now and every `PRUNE_EVERY` s."""
        while True:
            try:
                while (
                    await self.queue.prune(now() - timedelta(seconds=self.keep_for), PRUNE_BATCH)
                    == PRUNE_BATCH
                ):
                    pass
            except (SQLAlchemyError, OSError) as failed:
                log.warning("could not delete old webhook deliveries: %s; will retry", failed)
            await asyncio.sleep(PRUNE_EVERY * random.uniform(0.5, 1.5))

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._attempts.pop(task, None)

    async def _sleep(self) -> None:
        """Until the next delivery is due, new ones are stored, or a while has passed."""
        wait = IDLE_LOOK
        try:
            due = await self.queue.next_due()
        except (SQLAlchemyError, OSError) as failed:
            log.warning("could not read webhook deliveries: %s; will retry", failed)
            due, wait = None, STORE_RETRY
        if due is not None:
            wait = min(wait, max(0.0, (due - now()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait)

    async def _attempt(self, delivery: Claimed) -> None:
        endpoint = self.webhooks.endpoints.get(delivery.endpoint)
        if endpoint is None:
            outcome = Outcome(
                delivered=False,
                retry=False,
                error=f"The endpoint {delivery.endpoint!r} is no longer registered.",
            )
        else:
            outcome = await self.sender.send(endpoint, delivery.id, delivery.payload)
        try:
            await self._record(delivery, outcome)
        except (SQLAlchemyError, OSError) as failed:
            # Its claim runs out and it is attempted again: at least once, never lost.
            log.warning("could not record webhook delivery %s: %s", delivery.id, failed)

    async def _record(self, delivery: Claimed, outcome: Outcome) -> None:
        if outcome.delivered:
            await self.queue.delivered(delivery.id, outcome.response or 200)
            self.metrics.webhook_attempts.labels(delivery.event, "delivered").inc()
            latency = (now() - delivery.created_at).total_seconds()
            self.metrics.webhook_latency.labels(delivery.event).observe(latency)
            return
        error = outcome.error or "The delivery failed."
        give_up_at = delivery.created_at + timedelta(seconds=self.retry_for)
        wait = backoff(delivery.attempts, self.first_retry)
        if outcome.retry_after is not None:
            wait = max(wait, outcome.retry_after)
        at = now() + timedelta(seconds=wait)
        if outcome.retry and at <= give_up_at:
            await self.queue.again(delivery.id, at, outcome.response, error)
            # The loop slept as if this one were claimed for its whole lease: it looks again.
            self.wake()
            self.metrics.webhook_attempts.labels(delivery.event, "retrying").inc()
            log.info(
                "webhook %s to %s failed (attempt %d), retrying in %.1f s: %s",
                delivery.id,
                delivery.endpoint,
                delivery.attempts,
                wait,
                error,
            )
            return
        if outcome.retry:
            error = f"Gave up after {delivery.attempts} attempts. {error}"
        await self.queue.failed(delivery.id, outcome.response, error)
        self.metrics.webhook_attempts.labels(delivery.event, "failed").inc()
        log.warning("webhook %s to %s failed: %s", delivery.id, delivery.endpoint, error)
