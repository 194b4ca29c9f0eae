"""What the server is doing, for Prometheus (served at `GET /metrics` by
`backend/web/metrics_route.py`).

Each app has its own registry, so several apps in one process (the tests) count apart. Under
`python -m backend --workers N` every worker writes its values to files in
`PROMETHEUS_MULTIPROC_DIR` (set by backend/process/workers.py) and any worker's `/metrics` reports
them all, summed; a worker that dies leaves its counters and takes its gauges with it.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from schemas import EndStatus, ErrorCode, Usage

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# Seconds: a local model's first token can take a while; a stop should take milliseconds.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)
STOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

Limit = str  # "questions", "tokens", "replies", "connections"


class Metrics:
    """The app's instruments; each method records one event."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        # In multiprocess mode the values live in files, read back by a collector at scrape
        # time; the instruments must then not be registered anywhere themselves.
        self.registry = CollectorRegistry()
        own = None if self.multiprocess else self.registry
        if self.multiprocess:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.connections = Gauge(
            "chat_open_connections",
            "Open WebSockets and joined SSE streams.",
            ["kind"],
            registry=own,
            multiprocess_mode="livesum",
        )
        self.replies = Counter(
            "chat_replies", "Replies ended, by how they ended.", ["status"], registry=own
        )
        self.upstream_errors = Counter(
            "chat_upstream_errors", "Replies that failed, by error code.", ["code"], registry=own
        )
        self.first_token = Histogram(
            "chat_time_to_first_token_seconds",
            "From a reply's start to its first token reaching its clients.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=own,
        )
        self.stop_latency = Histogram(
            "chat_stop_to_end_seconds",
            "From a stop (or pre-emption, reset, delete) to the reply's `end`.",
            buckets=STOP_BUCKETS,
            registry=own,
        )
        self.tokens_relayed = Counter(
            "chat_tokens_relayed", "Pieces of reply text relayed from the model.", registry=own
        )
        self.model_tokens = Counter(
            "chat_model_tokens",
            "Model tokens replies took (see the `usage` of `end` frames).",
            ["kind"],
            registry=own,
        )
        self.resumes = Counter(
            "chat_resumes",
            "Clients that rejoined a conversation after a `seq` (`?after=`, Last-Event-ID).",
            registry=own,
        )
        self.quota_refusals = Counter(
            "chat_quota_refusals", "Requests a quota refused, by limit.", ["limit"], registry=own
        )
        self.webhook_attempts = Counter(
            "chat_webhook_attempts",
            "Webhook delivery attempts, by event and outcome (delivered, retrying, failed).",
            ["event", "outcome"],
            registry=own,
        )
        self.webhook_latency = Histogram(
            "chat_webhook_delivery_seconds",
            "From an event to its delivery, retries included, by event.",
            ["event"],
            buckets=WEBHOOK_BUCKETS,
            registry=own,
        )

    def reply_ended(
        self,
        status: EndStatus,
        error: ErrorCode | None,
        first_token_after: float | None,
        tokens: int,
        usage: Usage | None,
    ) -> None:
        self.replies.labels(status).inc()
        if error is not None:
            self.upstream_errors.labels(error).inc()
        if first_token_after is not None:
            self.first_token.observe(first_token_after)
        if tokens:
            self.tokens_relayed.inc(tokens)
        if usage is not None:
            self.model_tokens.labels("prompt").inc(usage.prompt_tokens)
            self.model_tokens.labels("completion").inc(usage.completion_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
