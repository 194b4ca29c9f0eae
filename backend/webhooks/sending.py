"""One attempt to deliver a webhook: signed, sent to an address that is allowed, and judged.

Signatures follow the Standard Webhooks specification (`webhook-id`, `webhook-timestamp`,
`webhook-signature`, made by the `standardwebhooks` package), one per secret of the endpoint, so
a receiver that knows either of two secrets accepts it while a secret is being rotated.

The connection goes only where the check let it: the host is resolved here, every address is
checked (private, loopback, link-local, multicast and reserved ones are refused unless allowed,
IPv4 inside IPv6 included), and the connection is made to the checked address itself, so a name
server cannot answer one address to the check and another to the connection. Redirects are
not followed, and no more than `RESPONSE_LIMIT` bytes of an answer are read.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpcore
from standardwebhooks.webhooks import Webhook

from backend.config.webhook_endpoints import WebhookEndpoint, loopback_host

RESPONSE_LIMIT = 4096
USER_AGENT = b"chat-server-webhooks/1"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedAddress(Exception):
    """The endpoint's host is, or resolves to, an address webhooks may not be sent to."""


def kind_of(address: IPAddress) -> str | None:
    """What makes `address` one webhooks are not sent to, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, bad in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved or not address.is_global),
    ):
        if bad:
            return kind
    return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses that pass the check."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.allowed(host, port)
        failure: Exception = httpcore.ConnectError(f"{host} has no address")
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as failed:
                failure = failed
        raise failure

    async def allowed(self, host: str, port: int) -> list[str]:
        """The addresses of `host` a webhook may be sent to; `RefusedAddress` if none."""
        try:
            found = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as failed:
            raise httpcore.ConnectError(f"{host} could not be resolved ({failed})") from failed
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        named_loopback = loopback_host(host)
        allowed = []
        refusal = ""
        for text in addresses:
            kind = kind_of(ipaddress.ip_address(text))
            if kind is None or self.allow_private or (named_loopback and kind == "loopback"):
                allowed.append(text)
            elif not refusal:
                named = host.strip("[]")
                refusal = (
                    f"{text} is a {kind} address"
                    if named == text
                    else (f"{host} is {text}, a {kind} address")
                )
        if not allowed:
            raise RefusedAddress(
                f"{refusal}: webhooks go to public addresses only, unless "
                "CHAT_WEBHOOK_ALLOW_PRIVATE=true (a URL naming localhost or 127.0.0.1 may "
                "always use loopback)."
            )
        return allowed

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109  # httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise RefusedAddress("webhooks are not sent over Unix sockets.")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@dataclass(frozen=True)
class Outcome:
    """How one attempt went."""

    delivered: bool
    # Whether another attempt may go better (timeouts, connection errors, 429 and 5xx).
    retry: bool
    response: int | None = None
    error: str | None = None
    # Seconds the receiver asked to wait (`Retry-After`), if it did.
    retry_after: float | None = None


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def signed_headers(
    endpoint: WebhookEndpoint, delivery_id: str, payload: str, moment: datetime
) -> list[tuple[bytes, bytes]]:
    """The headers of one attempt: the payload signed with each of the endpoint's secrets."""
    signatures = " ".join(
        Webhook(secret.get_secret_value()).sign(delivery_id, moment, payload)
        for secret in endpoint.secrets
    )
    return [
        (b"content-type", b"application/json"),
        (b"user-agent", USER_AGENT),
        (b"webhook-id", delivery_id.encode()),
        (b"webhook-timestamp", str(int(moment.timestamp())).encode()),
        (b"webhook-signature", signatures.encode()),
    ]


def judged(status: int, headers: list[tuple[bytes, bytes]]) -> Outcome:
    """What a receiver's answer means for the delivery."""
    if 200 <= status < 300:
        return Outcome(delivered=True, retry=False, response=status)
    header = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
    if status == 429 or status >= 500:
        return Outcome(
            delivered=False,
            retry=True,
            response=status,
            error=f"The receiver answered {status}.",
            retry_after=retry_after(header.get("retry-after")),
        )
    if 300 <= status < 400:
        where = header.get("location", "elsewhere")[:200]
        return Outcome(
            delivered=False,
            retry=False,
            response=status,
            error=f"The receiver answered {status}, a redirect to {where}; redirects are not "
            "followed: register the URL it points to.",
        )
    return Outcome(
        delivered=False,
        retry=False,
        response=status,
        error=f"The receiver answered {status}; only 429 and 5xx answers are retried.",
    )


class Sender:
    """Sends webhook attempts through one pool of connections (kept alive per receiver)."""

    def __init__(self, timeout: float, concurrency: int, allow_private: bool) -> None:
        self.timeout = timeout
        self.pool = httpcore.AsyncConnectionPool(
            max_connections=concurrency,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(allow_private),
        )

    async def close(self) -> None:
        await self.pool.aclose()

    async def send(self, endpoint: WebhookEndpoint, delivery_id: str, payload: str) -> Outcome:
        """One attempt to deliver `payload` to `endpoint`, whatever happens, within the
        timeout."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._post(endpoint, delivery_id, payload)
        except TimeoutError:
            return Outcome(
                delivered=False,
                retry=True,
                error=f"The receiver did not answer within {self.timeout:g} s.",
            )
        except RefusedAddress as refused:
            return Outcome(delivered=False, retry=False, error=str(refused))
        except httpcore.TimeoutException:
            spent = time.monotonic() - started
            return Outcome(
                delivered=False, retry=True, error=f"The receiver timed out after {spent:.1f} s."
            )
        except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as failed:
            reason = (str(failed) or type(failed).__name__).rstrip(".")
            return Outcome(
                delivered=False, retry=True, error=f"Could not reach the receiver: {reason}."
            )

    async def _post(self, endpoint: WebhookEndpoint, delivery_id: str, payload: str) -> Outcome:
        body = payload.encode()
        headers = signed_headers(endpoint, delivery_id, payload, datetime.now(UTC))
        headers.append((b"content-length", str(len(body)).encode()))
        timeouts = {"connect": self.timeout, "read": self.timeout, "write": self.timeout}
        async with self.pool.stream(
            "POST", endpoint.url, headers=headers, content=body, extensions={"timeout": timeouts}
        ) as response:
            read = 0
            async for chunk in response.aiter_stream():
                read += len(chunk)
                if read >= RESPONSE_LIMIT:
                    break
            return judged(response.status, response.headers)
