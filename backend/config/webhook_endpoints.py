"""The webhook endpoints an operator registers (`CHAT_WEBHOOKS`), checked at start.

`CHAT_WEBHOOKS` is a JSON list of endpoints, each with a `name` questions use to ask for it,
the `url` it is called at, one or more `secrets` it is signed with (two during a rotation: each
delivery then carries both signatures), the `events` it wants and whether it hears of every
conversation (`every_conversation`) or only of the questions that name it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from schemas.webhooks import EVENT_TYPES, WEBHOOK_NAME, WebhookEventType

SECRET_PREFIX = "whsec_"
LOOPBACK_NAMES = {"localhost"}
HOW_TO_MAKE = (
    "; make one with: python -c \"import base64, os; print('whsec_' + "
    'base64.b64encode(os.urandom(32)).decode())"'
)


def loopback_host(host: str) -> bool:
    """Whether a URL's host is this machine by name or address (`localhost`, `127.0.0.1`,
    `::1`), as written, not as any name server might resolve it."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secret_bytes(secret: str) -> bytes:
    """The key a Standard Webhooks secret stands for (`whsec_` then base64)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with '{SECRET_PREFIX}'{HOW_TO_MAKE}")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "==", validate=False)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) < 16:
        raise ValueError(
            f"a webhook secret is '{SECRET_PREFIX}' and at least 16 random bytes in base64"
            + HOW_TO_MAKE
        )
    return key


class WebhookEndpoint(BaseModel):
    """One endpoint of `CHAT_WEBHOOKS`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    url: str
    secrets: list[SecretStr] = Field(min_length=1, max_length=2)
    events: list[WebhookEventType] = Field(default_factory=lambda: list(EVENT_TYPES), min_length=1)
    every_conversation: bool = False

    @model_validator(mode="before")
    @classmethod
    def _one_secret(cls, value: object) -> object:
        # `"secret": "whsec_..."` for the usual one, `"secrets": [old, new]` during a rotation.
        if not isinstance(value, dict):
            return value
        if "secret" in value and "secrets" in value:
            raise ValueError(
                "give an endpoint `secret` or `secrets` (two, while rotating), not both"
            )
        if "secret" not in value and "secrets" not in value:
            raise ValueError("each endpoint needs a `secret` (whsec_...) to sign its deliveries")
        if "secret" in value:
            value = {**value, "secrets": value["secret"]}
            del value["secret"]
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(WEBHOOK_NAME, value):
            raise ValueError(
                f"{value[:40]!r} is not an endpoint name: up to 32 characters, a-z, 0-9, _ and "
                "-, starting with a letter or digit"
            )
        return value

    @field_validator("secrets", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("secrets")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for secret in value:
            secret_bytes(secret.get_secret_value())
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.username or parts.password:
            raise ValueError(
                "a webhook URL carries no user or password: the signature is the proof"
            )
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def plain_http(self) -> bool:
        return urlsplit(self.url).scheme == "http"


def check_endpoints(endpoints: list[WebhookEndpoint], allow_http: bool) -> None:
    """Refuse names used twice, and plain http off loopback unless it is allowed."""
    names = [endpoint.name for endpoint in endpoints]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"webhook endpoint names must differ: {', '.join(twice)} is used twice")
    for endpoint in endpoints:
        if endpoint.plain_http and not allow_http and not loopback_host(endpoint.host):
            raise ValueError(
                f"webhook endpoint {endpoint.name!r} is plain http off this machine: use https, "
                "or set CHAT_WEBHOOK_ALLOW_HTTP=true on a network you trust"
            )
