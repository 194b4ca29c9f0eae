"""Fixtures: one fake model server for the session, and a live app pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from backend.config import Settings
from tests.fake_upstream import FakeUpstream
from tests.harness import IsolatedSettings, LiveServer, SettingsFactory, live_server


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The fake model server, with a clean record and default behaviour for each test."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def make_settings(fake: FakeUpstream) -> SettingsFactory:
    """Settings pointed at the fake model server, overridable per test."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "openai_base_url": fake.url,
            "chat_model": "fake-model",
            "chat_timeout": 3.0,
            "chat_retry_delay": 0.05,
        }
        values.update(overrides)
        return IsolatedSettings(**values)

    return make


@pytest.fixture
def server(make_settings: SettingsFactory) -> Iterator[LiveServer]:
    """The app, live on a loopback port, talking to the fake model server."""
    with live_server(make_settings()) as live:
        yield live
