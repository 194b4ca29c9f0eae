"""Who is asking: bearer credentials (JWTs, API keys) and single-use WebSocket tickets.

With `CHAT_AUTH=none` everyone is the one anonymous user (conversations are shared, as on a
machine of one's own). With `CHAT_AUTH=token` every request carries `Authorization: Bearer`:
a JWT, checked with PyJWT (HS256 with `CHAT_JWT_SECRET`, or RS256/ES256 with the keys an
identity provider publishes at `CHAT_JWKS_URL`; `sub` is the user, `exp` is required), or one
of the static API keys of `CHAT_API_KEYS`. A browser cannot set headers on a WebSocket, so it
first trades its token for a ticket (`POST /api/ws-ticket`): random, good for one handshake
within `TICKET_TTL` seconds, which keeps the long-lived token out of URLs and logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import jwt

from backend.config.redis_clients import SharedRedis
from backend.config.settings import Settings

# Seconds a WebSocket ticket may wait for its handshake.
TICKET_TTL = 30
# The user every request is in when authentication is off.
ANONYMOUS = ""
# Seconds the signing keys fetched from a JWKS URL are kept before they are fetched again.
JWKS_LIFESPAN = 300
JWKS_TIMEOUT = 5
ASYMMETRIC = ["RS256", "ES256"]
REFUSED = "A valid bearer token is required: pass it as 'Authorization: Bearer TOKEN'."
# API-key users are named apart from JWT subjects, so a sign-in service's user named like a
# script (`sub: ci-bot`) never reads that script's conversations, nor the other way round.
KEY_USER_PREFIX = "key:"


class Unauthorized(Exception):
    """A credential that is missing, malformed, forged or expired; the message says which."""


@dataclass(frozen=True)
class Principal:
    """A caller: whose conversations it sees and until when its credential holds."""

    user: str
    # Seconds since the epoch when the credential stops being valid; None: it does not expire.
    expires_at: float | None = None

    def expires_in(self) -> float | None:
        """Seconds left until the credential expires, or None."""
        return None if self.expires_at is None else self.expires_at - time.time()


def bearer(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer` header, if there is one."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def anonymous_refusal(settings: Settings, host: str) -> str | None:
    """Why the server must not serve anonymously on `host`, or None if it may."""
    if settings.chat_auth != "none" or settings.chat_allow_anonymous or is_loopback(host):
        return None
    return (
        f"refusing to serve {host} without authentication: anyone who can reach it could spend "
        "the model's tokens and read every conversation. Set CHAT_AUTH=token (with "
        "CHAT_JWT_SECRET, CHAT_JWKS_URL or CHAT_API_KEYS), or CHAT_ALLOW_ANONYMOUS=1 if another "
        "layer guards it."
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Authenticator:
    """Turns a bearer token into a `Principal`, or refuses it."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.chat_auth == "token"
        secret = settings.chat_jwt_secret
        self.secret = secret.get_secret_value() if secret is not None else None
        self.audience = settings.chat_jwt_audience
        self.issuer = settings.chat_jwt_issuer
        self.jwks = (
            jwt.PyJWKClient(
                settings.chat_jwks_url,
                cache_keys=True,
                lifespan=JWKS_LIFESPAN,
                timeout=JWKS_TIMEOUT,
            )
            if settings.chat_jwks_url
            else None
        )
        # Compared as digests, in constant time: a key's length or prefix never shows.
        self.keys = {_digest(key): KEY_USER_PREFIX + user for user, key in settings.api_keys}

    async def principal(self, token: str | None) -> Principal:
        """Who `token` says the caller is; raises `Unauthorized`."""
        if not self.enabled:
            return Principal(ANONYMOUS)
        if not token:
            raise Unauthorized(REFUSED)
        user = self._api_key_user(token)
        if user is not None:
            return Principal(user)
        if token.count(".") != 2:
            raise Unauthorized("The bearer token is neither a known API key nor a JWT.")
        return await self._verify(token)

    def _api_key_user(self, token: str) -> str | None:
        digest = _digest(token)
        found = None
        for known, user in self.keys.items():
            if hmac.compare_digest(known, digest):
                found = user
        return found

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm == "HS256" and self.secret is not None:
                key: Any = self.secret
            elif algorithm in ASYMMETRIC and self.jwks is not None:
                # PyJWKClient fetches with urllib, which blocks: off the event loop.
                signing = await asyncio.to_thread(self.jwks.get_signing_key_from_jwt, token)
                key = signing.key
            else:
                raise Unauthorized(f"Tokens signed with {algorithm!r} are not accepted here.")
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("The token has expired; sign in again.") from exc
        except jwt.PyJWKClientError as exc:
            raise Unauthorized(f"The token's signing key cannot be found: {exc}") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"The token was refused: {exc}") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthorized("The token names no user ('sub').")
        if subject.startswith(KEY_USER_PREFIX):
            raise Unauthorized(
                f"The token's user ('sub') may not start with {KEY_USER_PREFIX!r}: "
                "that prefix names the users of API keys."
            )
        return Principal(subject, float(claims["exp"]))


class Tickets:
    """Single-use tickets for a WebSocket handshake, in memory or, across workers, in Redis."""

    def __init__(self, shared: SharedRedis | None) -> None:
        # The workers' Redis client (`Cluster.redis`), when scaled out; its owner closes it.
        self.redis = shared
        self._local: dict[str, tuple[float, Principal]] = {}

    @staticmethod
    def _key(ticket: str) -> str:
        return f"chat:ticket:{hashlib.sha256(ticket.encode()).hexdigest()}"

    async def issue(self, principal: Principal) -> str:
        """A new ticket that stands for `principal` once, for `TICKET_TTL` seconds."""
        ticket = secrets.token_urlsafe(32)
        if self.redis is not None:
            value = json.dumps({"user": principal.user, "expires_at": principal.expires_at})
            await cast(Awaitable[Any], self.redis.set(self._key(ticket), value, ex=TICKET_TTL))
            return ticket
        now = time.monotonic()
        self._local = {k: v for k, v in self._local.items() if v[0] > now}
        self._local[self._key(ticket)] = (now + TICKET_TTL, principal)
        return ticket

    async def take(self, ticket: str) -> Principal:
        """The principal `ticket` stands for; it cannot be used again. Raises `Unauthorized`."""
        key = self._key(ticket)
        if self.redis is not None:
            value = await cast(Awaitable[str | None], self.redis.getdel(key))
            if value is not None:
                data = json.loads(value)
                return self._valid(Principal(data["user"], data["expires_at"]))
        else:
            held = self._local.pop(key, None)
            if held is not None and held[0] > time.monotonic():
                return self._valid(held[1])
        raise Unauthorized("The ticket is unknown, used or expired; ask for a new one.")

    @staticmethod
    def _valid(principal: Principal) -> Principal:
        left = principal.expires_in()
        if left is not None and left <= 0:
            raise Unauthorized("The token this ticket was issued for has expired; sign in again.")
        return principal
