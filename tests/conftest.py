"""Fixtures: one fake model server for the session, and a live app pointed at it per module."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest

from backend.config.settings import Settings
from deploy.services import Addressed, Deployment, Postgres, Redis, RedisCluster
from fakes.openai_server import FakeUpstream
from tests.harness import IsolatedSettings, SettingsFactory, live_server


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
    cluster = Postgres(durable=False)
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


@pytest.fixture(scope="session")
def deployment(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> Iterator[Deployment]:
    """nginx in front of two workers on Redis and PostgreSQL, shared by the modules that test
    the protocol against it (each test keeps to its own conversations)."""
    deployed = Deployment(2, deployment_env(upstream_server, postgres, redis_server)).start()
    yield deployed
    deployed.remove()


@pytest.fixture(scope="session")
def chain_deployment(
    upstream_server: FakeUpstream, postgres: Postgres, redis_server: Redis
) -> Iterator[Deployment]:
    """The same deployment, answering with a user's chain (`CHAT_CHAIN`) of the built-in one's
    shape: every guarantee the protocol suite checks must hold for any chain."""
    env = deployment_env(upstream_server, postgres, redis_server)
    deployed = Deployment(2, {**env, "CHAT_CHAIN": "tests.chains:like_built_in"}).start()
    yield deployed
    deployed.remove()


def deployment_env(
    fake: FakeUpstream, postgres: Postgres, redis: Redis | RedisCluster
) -> dict[str, str]:
    """The environment of a deployment's workers, pointed at the fake model."""
    return {
        "OPENAI_BASE_URL": fake.url,
        "CHAT_MODEL": "fake-model",
        "CHAT_TIMEOUT": "3",
        "CHAT_RETRY_DELAY": "0.05",
        "CHAT_DATABASE_URL": postgres.database(),
        # A deployment of its own: its own database, and its own keyspace (workers sharing a
        # Redis are one deployment, and recover each other's turns into their database).
        "CHAT_REDIS_URL": redis.fresh_url() if isinstance(redis, Redis) else redis.url,
    }


@pytest.fixture(scope="module", params=["single", "deployment", "chain"])
def server(request: pytest.FixtureRequest, upstream_server: FakeUpstream) -> Iterator[Addressed]:
    """The server every protocol test talks to, in both shapes it is deployed in: one process
    on SQLite, and nginx in front of two workers on Redis and PostgreSQL; and that deployment
    again with a user's chain in place of the built-in one.

    A test that needs other settings, or a fresh process, starts its own with `live_server`.
    """
    if request.param in ("deployment", "chain"):
        yield request.getfixturevalue(
            "deployment" if request.param == "deployment" else "chain_deployment"
        )
        return
    with live_server(fake_settings(upstream_server)) as live:
        yield live
