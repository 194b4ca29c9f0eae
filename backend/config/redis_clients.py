"""How every Redis client of a worker is opened: leases and frames, the tail, the rates."""

from __future__ import annotations

from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.maint_notifications import MaintNotificationsConfig

# A command whose connection broke is sent again this many times, on a fresh connection,
# after a short wait: a connection that died with a Redis that restarted (or was cut) costs
# no request, and a Redis that stays down still fails one within a fraction of a second, so
# clients hear `unavailable` at once.
REDIS_RETRIES = 2
REDIS_RETRY_BASE_S = 0.02
REDIS_RETRY_CAP_S = 0.2


def redis_options() -> dict[str, Any]:
    """What every Redis client of a worker (leases and frames, the tail, the rate limits) is
    opened with, so that each is whole again as soon as Redis is back."""
    return {
        "retry": Retry(
            ExponentialWithJitterBackoff(base=REDIS_RETRY_BASE_S, cap=REDIS_RETRY_CAP_S),
            REDIS_RETRIES,
        ),
        # redis-py's default ("auto") turns off the pool's check, as it hands a connection
        # out, that the server has not closed it: every connection that outlived a Redis
        # restart would fail the next request made on it.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
