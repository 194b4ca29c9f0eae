"""Fixtures: one fake model server for the session, and a live app pointed at it per module."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from backend.config import Settings
from fakes.openai_server import FakeUpstream
from tests.harness import IsolatedSettings, LiveServer, SettingsFactory, live_server
from tests.services import Postgres, Redis


def fake_settings(fake: FakeUpstream, **overrides: Any) -> Settings:
    """Settings pointed at the fake model server, with `overrides`."""
    values: dict[str, Any] = {
        "openai_base_url": fake.url,
        "chat_model": "fake-model",
        "chat_timeout": 3.0,
        "chat_retry_delay": 0.05,
    }
    values.update(overrides)
    return IsolatedSettings(**values)


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
    return functools.partial(fake_settings, fake)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster for the whole session; each user makes its own database."""
    cluster = Postgres()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    """A Redis server for the whole session."""
    server = Redis()
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def server(upstream_server: FakeUpstream) -> Iterator[LiveServer]:
    """The app with default settings, live on a loopback port for a whole test module.

    Conversations live in their sockets, so tests sharing it cannot see each other's; a test
    that needs other settings, or a fresh process, starts its own with `live_server`.
    """
    with live_server(fake_settings(upstream_server)) as live:
        yield live
