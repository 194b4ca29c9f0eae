"""Settings, read once from the environment (and an optional `.env`) and passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from limits import parse
from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.config.webhook_endpoints import WebhookEndpoint, check_endpoints

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer clearly and concisely. "
    "If you do not know something, say so."
)

# The embedded store: one SQLite file in the git-ignored data/ folder of the checkout.
DEFAULT_DATABASE_URL = (
    f"sqlite+aiosqlite:///{Path(__file__).resolve().parents[2] / 'data' / 'chat.db'}"
)

Mode = Literal["local", "openai", "remote"]
LogFormat = Literal["text", "json"]
DEFAULT_TEMPERATURE = 0.7
# The bundled SmolLM2-135M's model card recommends about 0.2; at 0.7 its answers drift.
LOCAL_TEMPERATURE = 0.2


class Settings(BaseSettings):
    """Everything the server can be told; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    openai_api_key: SecretStr | None = Field(
        default=None, description="API key; alone, it selects OpenAI"
    )
    openai_base_url: str | None = Field(
        default=None,
        description="base URL of any OpenAI-compatible server, e.g. `http://127.0.0.1:8080/v1` "
        "(a key is then optional)",
    )
    chat_model: str = Field(
        default="gpt-4o-mini",
        description="model name sent to OpenAI or `OPENAI_BASE_URL` (the embedded model is "
        "named after its file)",
    )
    chat_temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="sampling temperature, 0 to 2; the small embedded model wanders at higher ones",
        json_schema_extra={"shown_default": "`0.7` (embedded model: `0.2`)"},
    )
    chat_system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT,
        description="the system message of every request",
        json_schema_extra={"shown_default": "a short helpful-assistant prompt"},
    )
    chat_chain: str | None = Field(
        default=None,
        description="the chain that answers: `package.module:attribute`, a LangChain runnable "
        '(or a factory given the chat model) invoked with `{"messages": [...]}`, or the name '
        "of one in `CHAT_CHAINS`; unset, the built-in chain (`chat`)",
    )
    chat_chains: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="more chains to offer, comma-separated `name=package.module:attribute`; a "
        "conversation is opened with one (`?assistant=NAME`)",
    )
    chat_history_tokens: int = Field(
        default=3000,
        ge=0,
        description="tokens of earlier turns kept per conversation; the oldest turns are "
        "dropped first",
    )
    chat_max_reply_tokens: int | None = Field(
        default=None,
        ge=1,
        description="longest reply, in tokens",
        json_schema_extra={"shown_default": "server's limit (embedded: `512`)"},
    )
    chat_max_question_chars: int = Field(
        default=16_000, ge=1, description="longest question accepted"
    )
    chat_max_frame_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="largest WebSocket frame accepted; frames over 4 times this close the "
        "socket (1009)",
    )
    chat_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds to wait for the model server to connect, or between two pieces "
        "of a reply",
    )
    chat_retry_delay: float = Field(
        default=0.25,
        ge=0,
        description="seconds before the one retry of a request that failed before its first token",
    )
    chat_allowed_origins: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="comma-separated browser origins allowed besides the server's own, e.g. "
        "`https://app.example.com`",
    )
    chat_request_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds a client may leave a request unfinished without sending a byte "
        "(its head, or its body); then it gets 408 and its connection is closed",
    )
    chat_database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="where conversations are stored (SQLite or PostgreSQL): any SQLAlchemy "
        "async URL",
        json_schema_extra={"shown_default": "`sqlite+aiosqlite:///…/data/chat.db`"},
    )
    chat_log_format: LogFormat = Field(
        default="text",
        description="`json`: one JSON object per log line (time, level, logger, message, and "
        "the `conversation` and `reply` ids on every line of a reply); request lines never "
        "show query strings, so questions sent as `?prompt=` stay out of the log",
    )

    chat_auth: Literal["none", "token"] = Field(
        default="none",
        description="`token`: every request needs a bearer token (JWT or API key); see "
        "[docs/protocol.md](docs/protocol.md#who-is-asking-chat_authtoken). `none` refuses to "
        "serve a non-loopback address",
    )
    chat_allow_anonymous: bool = Field(
        default=False,
        description="`1`: serve a non-loopback address with `CHAT_AUTH=none` anyway "
        "(something else guards it)",
        json_schema_extra={"shown_default": "—"},
    )
    chat_jwt_secret: SecretStr | None = Field(
        default=None, description="HS256 secret of the JWTs your sign-in service issues"
    )
    chat_jwks_url: str | None = Field(
        default=None, description="your identity provider's JWKS URL, for RS256/ES256 JWTs"
    )
    chat_jwt_audience: str | None = Field(
        default=None, description="when set, JWTs must carry this `aud`"
    )
    chat_jwt_issuer: str | None = Field(
        default=None, description="when set, JWTs must carry this `iss`"
    )
    chat_api_keys: SecretStr | None = Field(
        default=None,
        description="static keys for scripts: `USER:KEY,USER:KEY`; their users are `key:USER`",
    )

    # Quotas in the `limits` notation: "20/minute", "200000/day", "5 per 10 seconds".
    chat_quota_questions: str | None = Field(
        default=None,
        description="per user (per address without auth): questions and regenerations per "
        "window, e.g. `20/minute`, `5 per 10 seconds`",
    )
    chat_quota_tokens: str | None = Field(
        default=None,
        description="per user: model tokens (prompt and reply) per window, e.g. `200000/day`",
    )
    chat_quota_replies: int | None = Field(
        default=None, ge=1, description="per user: replies being written at once"
    )
    chat_quota_connections: int | None = Field(
        default=None,
        ge=1,
        description="per user: open sockets and `/sse?conversation=` streams",
    )
    chat_metrics_token: SecretStr | None = Field(
        default=None,
        description="bearer token `GET /metrics` needs; unset, it is served to this machine's "
        "clients only",
    )

    chat_redis_url: str | None = Field(
        default=None,
        description="Redis shared by the workers of a scaled-out deployment "
        "(`redis://HOST:6379/0`), or a Redis Cluster (`redis+cluster://HOST:PORT,HOST:PORT`, "
        "any of its nodes); unset, one process serves alone",
    )
    chat_resume_grace: float = Field(
        default=30.0,
        ge=0,
        description="seconds a reply goes on after its last client left, so a reconnecting "
        "client finds it; `0` stops it at once",
    )
    chat_speedups: bool = Field(
        default=True,
        description="`false`: leave out the measured shortcuts on the token path (see "
        "`backend/speedups/`); replies are the same, only slower",
        json_schema_extra={"shown_default": "`true`"},
    )
    chat_shutdown_grace: float = Field(
        default=10.0,
        ge=0,
        description="seconds replies in flight get to finish when the server is stopped "
        "(SIGTERM, Ctrl-C)",
    )

    # Webhooks (backend/webhooks/): endpoints called when replies end.
    chat_webhook_allow_http: bool = Field(
        default=False,
        description="allow plain-http webhook URLs off this machine (on loopback they always are)",
    )
    chat_webhooks: list[WebhookEndpoint] = Field(
        default=[],
        description='webhook endpoints, a JSON list of `{"name", "url", "secret"}` '
        "(optional `events`, `every_conversation`); a background question names one to be "
        "called when its reply ends (see docs/protocol.md, Webhooks)",
    )
    chat_webhook_timeout: float = Field(
        default=10.0, gt=0, le=300, description="seconds one webhook delivery attempt may take"
    )
    chat_webhook_retry_for: float = Field(
        default=86400.0,
        gt=0,
        description="seconds a webhook delivery is retried for before it is kept as failed",
    )
    chat_webhook_keep_for: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="seconds a finished webhook delivery (delivered or failed) is kept, for the "
        "deliveries log and redelivery, after its last attempt; then it is deleted",
    )
    chat_webhook_first_retry: float = Field(
        default=5.0,
        gt=0,
        description="seconds before a failed webhook delivery is first retried; each retry "
        "waits about twice as long as the one before (at most an hour)",
    )
    chat_webhook_concurrency: int = Field(
        default=16, ge=1, le=1000, description="webhook deliveries in flight at once, per worker"
    )
    chat_webhook_allow_private: bool = Field(
        default=False,
        description="deliver webhooks to private, loopback and link-local addresses too (a URL "
        "that names `localhost` or `127.0.0.1` itself always may)",
    )
    chat_admins: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="comma-separated users who may list and redeliver webhook deliveries "
        "(`key:NAME` for an API key's); with `CHAT_AUTH=none`, everyone",
    )

    # The embedded model, used when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set.
    local_model_path: str | None = Field(
        default=None,
        description="a GGUF file for the embedded model",
        json_schema_extra={"shown_default": "the bundled SmolLM2-135M"},
    )
    local_model_context: int = Field(
        default=2048,
        ge=256,
        description="the embedded model's context, in tokens; history is fitted into it with "
        "the model's own tokenizer, leaving room for the reply",
    )
    local_model_threads: int = Field(
        default=2, ge=1, description="CPU threads for the embedded model"
    )
    local_model_start_timeout: float = Field(
        default=120.0,
        gt=0,
        description="seconds a question waits for the embedded model to start",
    )

    @field_validator("chat_chains", mode="before")
    @classmethod
    def _split_chains(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("chat_admins", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("chat_webhooks")
    @classmethod
    def _webhook_endpoints(
        cls, value: list[WebhookEndpoint], info: ValidationInfo
    ) -> list[WebhookEndpoint]:
        check_endpoints(value, bool(info.data.get("chat_webhook_allow_http")))
        return value

    @field_validator("chat_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("chat_quota_questions", "chat_quota_tokens", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                amount = parse(value).amount
            except ValueError:
                amount = 0
            if amount < 1:
                raise ValueError(
                    f"{value!r} is not a rate: write it like '20/minute' or '100000 per day'."
                )
        return value

    @field_validator("openai_base_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @property
    def api_keys(self) -> list[tuple[str, str]]:
        """`CHAT_API_KEYS` as (user, key) pairs; a user may have several keys."""
        if self.chat_api_keys is None:
            return []
        pairs: list[tuple[str, str]] = []
        for entry in self.chat_api_keys.get_secret_value().split(","):
            if not entry.strip():
                continue
            user, _, key = entry.strip().partition(":")
            if not user or not key:
                raise ValueError("CHAT_API_KEYS entries must look like USER:KEY.")
            pairs.append((user, key))
        return pairs

    @property
    def mode(self) -> Mode:
        """Which upstream the chain talks to."""
        if self.openai_base_url:
            return "remote"
        if self.openai_api_key is not None and self.openai_api_key.get_secret_value():
            return "openai"
        return "local"

    @property
    def temperature(self) -> float:
        """The sampling temperature: as set, or the default for the upstream in use."""
        if self.chat_temperature is not None:
            return self.chat_temperature
        return LOCAL_TEMPERATURE if self.mode == "local" else DEFAULT_TEMPERATURE

    @property
    def ws_max_size(self) -> int:
        """Frames this far beyond the limit are refused by the server itself (close code 1009)."""
        return 4 * self.chat_max_frame_bytes
