"""How much each user may ask: questions per window, model tokens per window, replies at once,
open connections. Per user, or per client address when auth is off.

Rates are the `limits` library's (memory storage in one process, Redis storage when
`CHAT_REDIS_URL` is set, so every worker counts the same): questions in a moving window, tokens
in a fixed one, charged as each reply ends. Replies and connections at once are not rates: they
are slots held while something runs (see `Slots`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from fastapi import HTTPException, status
from fastapi.responses import PlainTextResponse
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from starlette.datastructures import Address

from backend.config.redis_clients import SharedRedis, is_cluster, redis_options
from backend.config.settings import Settings
from backend.config.timings import SLOT_RETRY_AFTER, TOKENS_RECHECK
from backend.observe.metrics import Limit, Metrics
from backend.protocol.errors import SHARED_STATE_ERRORS, ChatError
from backend.speedups import usable
from backend.speedups.memory_rates import MemoryRates
from backend.users.auth import Principal
from backend.users.slots import MemorySlots, RedisSlots, Slots
from schemas import ChatResponse, Usage

log = logging.getLogger(__name__)

# For how many users at most a "tokens left" read from Redis stands (`TOKENS_RECHECK`).
TOKENS_FINE_USERS = 10_000
# What each rate counts, so that a question rate and a token rate of the same window differ.
QUESTIONS = "questions"
TOKENS = "tokens"


class RateLimited(ChatError):
    """A quota refused the request; `retry_after` says when the same request would pass."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__("rate_limited", message)
        self.retry_after = retry_after

    def frame(self) -> ChatResponse:
        frame = super().frame()
        if self.retry_after is not None:
            frame.retry_after = round(self.retry_after, 1)
        return frame

    @property
    def headers(self) -> dict[str, str]:
        """The headers of an HTTP 429: `Retry-After` in whole seconds, at least one."""
        wait = SLOT_RETRY_AFTER if self.retry_after is None else self.retry_after
        return {"Retry-After": str(max(1, math.ceil(wait)))}

    def http(self) -> HTTPException:
        """This refusal as an HTTP 429."""
        return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, self.message, self.headers)

    def denial(self) -> PlainTextResponse:
        """This refusal as the HTTP 429 that answers a WebSocket handshake."""
        return PlainTextResponse(
            self.message, status.HTTP_429_TOO_MANY_REQUESTS, headers=self.headers
        )


def wait_phrase(seconds: float) -> str:
    """'in 12 seconds', 'in 4 minutes', 'in 3 hours 5 minutes'."""
    seconds = max(1, round(seconds))
    if seconds < 90:
        return f"in {seconds} second{'s' if seconds != 1 else ''}"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"in {minutes} minutes"
    hours, minutes = divmod(minutes, 60)
    return f"in {hours} hours" + (f" {minutes} minutes" if minutes else "")


def window_phrase(item: RateLimitItem) -> str:
    """'per minute', 'per 2 seconds', 'per day'."""
    unit = item.GRANULARITY.name
    if item.multiples == 1:
        return f"per {unit}"
    return f"per {item.multiples} {unit}s"


def quota_key(principal: Principal, client: Address | None) -> str:
    """Whose quotas a request counts against: its user, or its client's address when
    everyone is the one anonymous user of `CHAT_AUTH=none`."""
    if principal.user:
        return f"user:{principal.user}"
    return f"address:{client.host if client is not None else 'unknown'}"


async def _true() -> bool:
    return True


def new_holder() -> str:
    """A fresh name for a slot holder (one reply, one connection)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Held:
    """A reply admitted: who asked, and the slot it holds until it ends."""

    who: str
    holder: str


class Quotas:
    """The limits of one deployment; every worker of it shares their counts through Redis."""

    def __init__(self, settings: Settings, client: SharedRedis | None, metrics: Metrics) -> None:
        self.metrics = metrics
        self.questions = (
            parse(settings.chat_quota_questions) if settings.chat_quota_questions else None
        )
        self.tokens = parse(settings.chat_quota_tokens) if settings.chat_quota_tokens else None
        self.replies = settings.chat_quota_replies
        self.connections = settings.chat_quota_connections
        self.enabled = any(
            limit is not None
            for limit in (self.questions, self.tokens, self.replies, self.connections)
        )
        url = settings.chat_redis_url
        self.remote = url is not None  # the counts are in Redis, a round trip away
        # The rates' own connections to Redis, opened like the cluster's (and closed with us).
        self._rates_pool: redis.ConnectionPool | None = None
        storage: Storage
        if url and is_cluster(url):
            # `limits` opens its own cluster client, from a URL of its form.
            nodes = url.partition("://")[2]
            storage = RedisClusterStorage(
                f"async+redis+cluster://{nodes}",
                implementation="redispy",
                key_prefix="chat:limits",
                ssl=url.lower().startswith("rediss"),
                **redis_options(),
            )
        elif url:
            self._rates_pool = redis.ConnectionPool.from_url(url, **redis_options())
            pool: dict[str, Any] = {"connection_pool": self._rates_pool}
            storage = RedisStorage(
                f"async+{url}", implementation="redispy", key_prefix="chat:limits", **pool
            )
        elif usable("memory_rates", settings.chat_speedups):
            storage = MemoryRates()
        else:
            storage = MemoryStorage()
        self.moving = MovingWindowRateLimiter(storage)
        self.fixed = FixedWindowRateLimiter(storage)
        self.slots: Slots = RedisSlots(client) if client is not None else MemorySlots()
        self._counting: set[asyncio.Task[None]] = set()
        # Users whose tokens were left when last read, until when that stands (monotonic).
        self._tokens_fine: dict[str, float] = {}

    async def start(self) -> None:
        await self.slots.start()

    async def close(self) -> None:
        await asyncio.gather(*self._counting, return_exceptions=True)
        await self.slots.close()
        if self._rates_pool is not None:
            await self._rates_pool.aclose()

    # Replies.

    async def check(self, who: str) -> None:
        """Refuse a question now if its rates are used up (nothing is counted yet)."""
        questions, tokens = self.questions, self.tokens
        if questions is None and tokens is None:
            return
        testing_questions = self.moving.test(questions, QUESTIONS, who) if questions else _true()
        testing_tokens = self._tokens_left(tokens, who) if tokens else _true()
        if self.remote:  # both at once: one round trip's wait instead of two
            questions_left, tokens_left = await asyncio.gather(testing_questions, testing_tokens)
        else:
            questions_left, tokens_left = await testing_questions, await testing_tokens
        # A limit that is not set always has room (`_true`): only a set one refuses.
        if questions is not None and not questions_left:
            raise await self._questions_refused(questions, who)
        if tokens is not None and not tokens_left:
            raise await self._tokens_refused(tokens, who)

    async def _tokens_left(self, tokens: RateLimitItem, who: str) -> bool:
        """Whether `who` has tokens left. In Redis, a yes is taken as read for a second, until
        this worker charges them again: tokens are charged as replies end, so the count may
        trail by a reply anyway, and the round trip is saved for most questions."""
        if not self.remote:
            return await self.fixed.test(tokens, TOKENS, who)
        now = time.monotonic()
        if self._tokens_fine.get(who, 0.0) > now:
            return True
        left = await self.fixed.test(tokens, TOKENS, who)
        if left:
            if len(self._tokens_fine) > TOKENS_FINE_USERS:
                self._tokens_fine.clear()
            self._tokens_fine[who] = now + TOKENS_RECHECK
        return left

    async def begin_reply(self, who: str) -> Held | None:
        """Take a reply slot and count the question; None when nothing is limited.

        Called once the reply it pre-empts, if any, has ended and given its slot back, and
        after `check`. In Redis the question is counted on the side, off the way to the first
        token: questions sent at the same instant on several sockets may then share a window's
        last place.
        """
        if not self.enabled:
            return None
        holder = new_holder()
        if self.replies is not None and not await self.slots.acquire(
            "replies", who, holder, self.replies
        ):
            raise self._refused(
                "replies",
                f"You already have {self.replies} "
                f"repl{'ies' if self.replies != 1 else 'y'} in progress, the most allowed at "
                "once. Wait for one to finish, or stop it, and ask again.",
                None,
            )
        if self.questions is not None:
            if self.remote:  # off the way to the first token
                counting = asyncio.create_task(self._count_question(self.questions, who))
                self._counting.add(counting)
                counting.add_done_callback(self._counting.discard)
            else:
                await self.moving.hit(self.questions, QUESTIONS, who)
        return Held(who, holder)

    async def _count_question(self, questions: RateLimitItem, who: str) -> None:
        try:
            await self.moving.hit(questions, QUESTIONS, who)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot count a question: %s", exc)

    async def end_reply(self, held: Held | None, usage: Usage | None) -> None:
        """Give the slot back and charge the reply's tokens (never raises: the reply is over
        either way, and a slot that cannot be given back expires)."""
        if held is None:
            return
        try:
            if self.replies is not None:
                await self.slots.release("replies", held.who, held.holder)
            if self.tokens is not None and usage is not None:
                spent = usage.prompt_tokens + usage.completion_tokens
                self._tokens_fine.pop(held.who, None)
                if spent:
                    await self.fixed.hit(self.tokens, TOKENS, held.who, cost=spent)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot settle a reply's quotas: %s", exc)

    async def _questions_refused(self, questions: RateLimitItem, who: str) -> RateLimited:
        wait = await self._reset_in(self.moving, questions, QUESTIONS, who)
        return self._refused(
            "questions",
            f"You have asked {questions.amount} question"
            f"{'s' if questions.amount != 1 else ''} {window_phrase(questions)}, the "
            f"most allowed; you can ask again {wait_phrase(wait)}.",
            wait,
        )

    async def _tokens_refused(self, tokens: RateLimitItem, who: str) -> RateLimited:
        wait = await self._reset_in(self.fixed, tokens, TOKENS, who)
        return self._refused(
            "tokens",
            f"You have used your {tokens.amount:,} model tokens "
            f"{window_phrase(tokens)}; you can ask again {wait_phrase(wait)}.",
            wait,
        )

    def _refused(self, limit: Limit, message: str, retry_after: float | None) -> RateLimited:
        self.metrics.quota_refusals.labels(limit).inc()
        log.info("quota refused: %s", limit)
        return RateLimited(message, retry_after)

    @staticmethod
    async def _reset_in(
        limiter: MovingWindowRateLimiter | FixedWindowRateLimiter,
        item: RateLimitItem,
        kind: str,
        who: str,
    ) -> float:
        stats = await limiter.get_window_stats(item, kind, who)
        return max(0.0, stats.reset_time - time.time())

    # Connections.

    async def open_connection(self, who: str) -> str | None:
        """Count an open socket or stream; `RateLimited` when `who` has too many. Returns
        the slot's holder for `close_connection` (None when connections are not limited)."""
        limit = self.connections
        if limit is None:
            return None
        holder = new_holder()
        if not await self.slots.acquire("connections", who, holder, limit):
            raise self._refused(
                "connections",
                f"You have {limit} connection{'s' if limit != 1 else ''} open, the most "
                "allowed at once. Close one (another tab or client) and try again.",
                None,
            )
        return holder

    async def close_connection(self, who: str, holder: str | None) -> None:
        """The connection `open_connection` counted has closed (never raises)."""
        if holder is None:
            return
        try:
            await self.slots.release("connections", who, holder)
        except SHARED_STATE_ERRORS as exc:
            log.warning("cannot give back a connection slot: %s", exc)
