"""Settings, read once from the environment (and an optional `.env`) and passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from limits import parse
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.logs import LogFormat

OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer clearly and concisely. "
    "If you do not know something, say so."
)

# The embedded store: one SQLite file in the git-ignored data/ folder of the checkout.
DEFAULT_DATABASE_URL = (
    f"sqlite+aiosqlite:///{Path(__file__).resolve().parent.parent / 'data' / 'chat.db'}"
)

Mode = Literal["local", "openai", "remote"]
DEFAULT_TEMPERATURE = 0.7
# The bundled SmolLM2-135M's model card recommends about 0.2; at 0.7 its answers drift.
LOCAL_TEMPERATURE = 0.2


class Settings(BaseSettings):
    """Everything the server can be told; each field is an environment variable of the same name."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    chat_model: str = "gpt-4o-mini"
    # Unset: 0.7, or 0.2 for the embedded model, which wanders at higher temperatures.
    chat_temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    chat_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Tokens of earlier turns sent with each question; oldest turns go first.
    chat_history_tokens: int = Field(default=3000, ge=0)
    chat_max_question_chars: int = Field(default=16_000, ge=1)
    chat_max_frame_bytes: int = Field(default=64 * 1024, ge=1024)
    # Seconds to wait on the model server: to connect, and between two chunks of a reply.
    chat_timeout: float = Field(default=60.0, gt=0)
    # Seconds before the single retry of a request that failed before its first token.
    chat_retry_delay: float = Field(default=0.25, ge=0)
    chat_allowed_origins: Annotated[list[str], NoDecode] = []
    # Longest reply, in tokens; unset means the model server's own limit (local mode: 512).
    chat_max_reply_tokens: int | None = Field(default=None, ge=1)

    # Where conversations are stored: any SQLAlchemy async URL (SQLite or PostgreSQL).
    chat_database_url: str = DEFAULT_DATABASE_URL
    # Redis shared by every worker of a deployment (live frames, leases); unset: one process.
    chat_redis_url: str | None = None
    # Seconds a reply goes on after its last client left, so a reconnecting client finds it;
    # 0 stops it at once.
    chat_resume_grace: float = Field(default=30.0, ge=0)
    # Seconds replies in flight get to finish when the server is asked to stop.
    chat_shutdown_grace: float = Field(default=10.0, ge=0)
    # Log lines as readable text, or one JSON object per line (for log collectors).
    chat_log_format: LogFormat = "text"

    # Who may chat: everyone as one anonymous user, or bearer tokens (see backend/auth.py).
    chat_auth: Literal["none", "token"] = "none"
    # Serve anonymously on a non-loopback address anyway (another layer guards the port).
    chat_allow_anonymous: bool = False
    chat_jwt_secret: SecretStr | None = None  # HS256
    chat_jwks_url: str | None = None  # RS256 / ES256, keys published by an identity provider
    chat_jwt_audience: str | None = None
    chat_jwt_issuer: str | None = None
    # Static keys for scripts: comma-separated USER:KEY pairs.
    chat_api_keys: SecretStr | None = None

    # Quotas, per user (per client address when CHAT_AUTH=none); unset means unlimited.
    # Rates in the `limits` notation: "20/minute", "200000/day", "5 per 10 seconds".
    chat_quota_questions: str | None = None  # questions (and regenerations) asked
    chat_quota_tokens: str | None = None  # model tokens, prompt and reply, spent
    chat_quota_replies: int | None = Field(default=None, ge=1)  # replies running at once
    chat_quota_connections: int | None = Field(default=None, ge=1)  # open sockets and streams

    # `GET /metrics` needs this bearer token; unset, it is served to loopback clients only.
    chat_metrics_token: SecretStr | None = None

    # The embedded model, used when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set.
    local_model_path: str | None = None  # any GGUF file; default: the bundled SmolLM2-135M
    local_model_context: int = Field(default=2048, ge=256)
    local_model_threads: int = Field(default=2, ge=1)
    local_model_start_timeout: float = Field(default=120.0, gt=0)

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
