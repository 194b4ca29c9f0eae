"""How every Redis client of a worker is opened: leases and frames, the tail, the rates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.maint_notifications import MaintNotificationsConfig

# A command whose connection broke is sent again this many times, on a fresh connection,
# after a short wait: a connection that died with a Redis that restarted (or was cut) costs
# no request, and a Redis that stays down still fails one within a fraction of a second, so
# clients hear `unavailable` at once.
REDIS_RETRIES = 2
REDIS_RETRY_BASE_S = 0.02
REDIS_RETRY_CAP_S = 0.2


def redis_options() -> dict[str, Any]:
    """What every Redis client of a worker (leases and frames, the tail, the rate limits) is
    opened with, so that each is whole again as soon as Redis is back."""
    return {
        "retry": Retry(
            ExponentialWithJitterBackoff(base=REDIS_RETRY_BASE_S, cap=REDIS_RETRY_CAP_S),
            REDIS_RETRIES,
        ),
        # redis-py's default ("auto") turns off the pool's check, as it hands a connection
        # out, that the server has not closed it: every connection that outlived a Redis
        # restart would fail the next request made on it.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }


# The client of the Redis the workers share: one Redis, or a Redis Cluster.
SharedRedis = Redis | RedisCluster
# What a command can be queued on: a client or a pipeline of either kind.
ScriptClient = Any


async def run_script(
    script: AsyncScript, keys: Sequence[str], args: Sequence[str | float], pipe: ScriptClient
) -> None:
    """Queue `script` on a pipeline. A cluster's pipeline sends the script's source (`EVAL`):
    a node that has not seen it yet (a replica promoted a moment ago) runs it all the same,
    where `EVALSHA` would fail the whole batch."""
    if isinstance(pipe, ClusterPipeline):
        pipe.eval(cast(str, script.script), len(keys), *keys, *args)
    else:
        await script(keys=keys, args=args, client=pipe)


# `CHAT_REDIS_URL` names a Redis Cluster with these schemes: `redis+cluster://` (or, over TLS,
# `rediss+cluster://`), then optionally `user:password@`, then one or more of its nodes as
# `host:port`, comma-separated. Any node is enough to start; the client learns the rest.
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


@dataclass(frozen=True)
class ClusterAddress:
    """Where a Redis Cluster is, as `CHAT_REDIS_URL` says."""

    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None
    tls: bool


def is_cluster(url: str) -> bool:
    """Whether `url` names a Redis Cluster rather than one Redis."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def cluster_address(url: str) -> ClusterAddress:
    """The nodes and credentials a cluster URL names; `ValueError` with a sentence if it is
    not one."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError("A Redis Cluster URL starts with redis+cluster:// or rediss+cluster://.")
    userinfo, _, hosts = rest.rpartition("@")
    hosts = hosts.split("/", 1)[0]
    username, _, password = userinfo.partition(":")
    nodes = []
    for node in filter(None, hosts.split(",")):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{node!r} in the Redis Cluster URL is not host:port.")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("The Redis Cluster URL names no node (host:port).")
    return ClusterAddress(
        nodes, unquote(username) or None, unquote(password) or None, CLUSTER_SCHEMES[scheme]
    )


def open_cluster(url: str, max_connections: int, **options: Any) -> RedisCluster:
    """A client of the Redis Cluster `url` names, opened like every other Redis client here;
    `max_connections` is per node."""
    address = cluster_address(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        max_connections=max_connections,
        **{**redis_options(), **options},
    )
