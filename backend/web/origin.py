"""Which browser pages may open a socket or start a reply: the server's own, and those listed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from backend.users.auth import is_loopback


class ForeignOrigin(Exception):
    """A request that a browser made for another site's page (HTTP 403)."""


def origin_allowed(origin: str | None, host: str | None, allowed: Iterable[str]) -> bool:
    """Whether a handshake with this `Origin` header, sent to this `Host`, may proceed.

    No `Origin` means no browser is involved (a CLI or a script): nothing to guard against.
    A browser page may connect when it was served by this host, or its origin is listed.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in {entry.lower() for entry in allowed}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in {"http", "https"} or not parts.netloc or host is None:
        return False
    return _with_port(parts.netloc, parts.scheme) == _with_port(host.strip().lower(), parts.scheme)


def _with_port(netloc: str, scheme: str) -> str:
    """`netloc` with its port spelled out, so `example.com` equals `example.com:443` on https."""
    if netloc.endswith("]") or ":" not in netloc:
        return f"{netloc}:{443 if scheme == 'https' else 80}"
    return netloc


def request_allowed(headers: Mapping[str, str], allowed: Iterable[str]) -> bool:
    """Whether a request that starts a reply may come from where the browser says it does.

    Cross-site pages can make a visitor's browser send GETs without any script (an `<img>`
    pointing at `/stream`), spending tokens in the visitor's name: such requests carry
    `Sec-Fetch-Site: cross-site` and no `Origin`, so both headers are checked.
    """
    origin = headers.get("origin")
    if origin is not None:
        return origin_allowed(origin, headers.get("host"), allowed)
    return headers.get("sec-fetch-site") not in {"cross-site", "same-site"}


def origin_refusal(headers: Mapping[str, str], allowed: Iterable[str]) -> str | None:
    """Why this handshake or request must be refused (HTTP 403), or None if it may proceed.

    The one gate for the WebSocket and the HTTP streams alike.
    """
    if request_allowed(headers, allowed):
        return None
    origin = headers.get("origin")
    if origin is None:
        return (
            "Requests from another site's page are not allowed; a page of another origin "
            "must be listed in CHAT_ALLOWED_ORIGINS."
        )
    return f"Requests from {origin[:200]} are not allowed. Add it to CHAT_ALLOWED_ORIGINS."


def host_refusal(headers: Mapping[str, str], allowed: Iterable[str]) -> str | None:
    """Why a request to an unauthenticated server on this machine must be refused, or None.

    With no sign-in the only guard is that the server listens on loopback. A page elsewhere
    can still reach it by DNS rebinding (its own name, re-pointed at 127.0.0.1): the browser
    then sends that name as `Host`, and `Origin` matches it. So the name must be this
    machine's, or that of an allowed origin.
    """
    host = urlsplit(f"//{headers.get('host', '')}").hostname or ""
    if is_loopback(host) or host.endswith(".localhost"):
        return None
    if host in {urlsplit(entry).hostname for entry in allowed}:
        return None
    return (
        f"This server answers to this machine's names only (localhost, 127.0.0.1), not "
        f"{host[:100]!r}. Sign-in (CHAT_AUTH=token) or CHAT_ALLOWED_ORIGINS lets it serve others."
    )


def refuse_foreign(headers: Mapping[str, str], allowed: Iterable[str]) -> None:
    """Raise `ForeignOrigin` for a request or handshake that `origin_refusal` refuses."""
    refused = origin_refusal(headers, allowed)
    if refused is not None:
        raise ForeignOrigin(refused)
