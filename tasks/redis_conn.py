"""The Redis client factory, the one place redis-py errors are translated, and Lua loading.

The client factory: a real client from ``settings.redis_url`` (a
:class:`redis.cluster.RedisCluster` for a ``redis+cluster://`` URL), or in embedded mode
(no URL) an in-process fakeredis client on the one :func:`embedded_server` of this process.

On a Redis Cluster every command this project sends touches the keys of one connection or
one subscription, which share a hash tag (``{conn:ID}``, ``{sub:ID}``: :mod:`tasks.keys`)
and so one slot; pipelines that span connections are not transactions, and the cluster
client splits them per node. MOVED and ASK redirections are followed by redis-py.

Every client of one process shares the embedded server, so the budget, the leases and the
broker see the same data. Processes do not share it: embedded mode is for one process (tests,
demos, ``--pool=solo`` or threads), never for several workers.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any, TypeAlias

import fakeredis
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, NodesManager, RedisCluster
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.retry import Retry

from storage.errors import StorageUnavailable
from tasks.settings import Settings, cluster_url

# What connect() returns. Both offer every command the project sends; a cluster refuses
# keyless commands (TIME) inside a pipeline.
RedisClient: TypeAlias = redis.Redis | RedisCluster

SOCKET_CONNECT_TIMEOUT_SECONDS = 2.0
SOCKET_TIMEOUT_SECONDS = 5.0
HEALTH_CHECK_INTERVAL_SECONDS = 30
# redis-py's default retries ten times over several seconds. A worker is better served by
# failing fast into StorageUnavailable and letting Celery retry the task; a retried budget
# take whose first reply was lost can only count a call twice, never lose one.
RETRIES = 2
RETRY_BACKOFF_BASE_SECONDS = 0.05
RETRY_BACKOFF_CAP_SECONDS = 0.5

STORAGE_RETRY_AFTER_SECONDS = 2.0

# Redis could not serve the command; trying again later may work. Any other RedisError
# (WRONGTYPE, a Lua error, a bad argument) is a bug: retrying it every few seconds would only
# hide it, so it propagates unchanged.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # includes BusyLoadingError, AuthenticationError, ClusterUnreachable
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # failover: we reached a replica
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,  # CLUSTERDOWN, MASTERDOWN, redirected too often (resharding)
    redis.exceptions.TryAgainError,  # a slot is migrating
    SlotNotCoveredError,  # the cluster's map has a hole: a primary is down
    redis.exceptions.InvalidResponse,  # what answered at that address does not speak Redis
)

_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]*@")
_PASSWORD_ARG = re.compile(r"(password\s*[=:]\s*)\S+", re.IGNORECASE)


def load_script(name: str) -> str:
    """The text of one of the package's Lua scripts."""
    return files("tasks").joinpath(name).read_text(encoding="utf-8")


@contextmanager
def redis_errors(action: str, about: str) -> Iterator[None]:
    """Translate redis-py's availability errors into :class:`StorageUnavailable`; ``about``
    names what the command was for (``"connection 7"``, ``"subscription 3"``)."""
    try:
        yield
    except UNAVAILABLE as exc:
        raise unavailable(exc, action, about) from exc


def unavailable(exc: Exception, action: str, about: str) -> StorageUnavailable:
    """The :class:`StorageUnavailable` for ``exc``; its text never carries a password."""
    detail = _PASSWORD_ARG.sub(r"\1***", _URL_CREDENTIALS.sub("***@", str(exc)))
    return StorageUnavailable(
        f"Redis unavailable during {action} for {about}: {type(exc).__name__}: {detail}",
        retry_after=STORAGE_RETRY_AFTER_SECONDS,
    )


_server: fakeredis.FakeServer | None = None
_server_lock = threading.Lock()


def _forget_server_in_child() -> None:
    # A forked child must not share (or deadlock on) the parent's in-memory server.
    global _server, _server_lock
    _server = None
    _server_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_server_in_child)


def embedded_server() -> fakeredis.FakeServer:
    """The process-wide in-memory Redis server of embedded mode, created on first use."""
    global _server
    with _server_lock:
        if _server is None:
            _server = fakeredis.FakeServer()
        return _server


def connect(settings: Settings) -> RedisClient:
    """A Redis client for ``settings``; bytes in, bytes out (``decode_responses=False``).

    A cluster client reads the cluster's map when it is built: a cluster that cannot be
    reached then raises :class:`StorageUnavailable` here."""
    if settings.redis_url is None:
        return fakeredis.FakeRedis(server=embedded_server(), decode_responses=False)
    options: dict[str, Any] = {
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": SOCKET_TIMEOUT_SECONDS,
        "decode_responses": False,
        "retry": Retry(
            ExponentialWithJitterBackoff(
                base=RETRY_BACKOFF_BASE_SECONDS, cap=RETRY_BACKOFF_CAP_SECONDS
            ),
            retries=RETRIES,
        ),
    }
    if settings.redis_cluster:
        return _cluster(settings.redis_url, options)
    return redis.Redis.from_url(
        settings.redis_url, health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS, **options
    )


class ClusterUnreachable(redis.ConnectionError):
    """No usable map of the cluster could be read: no seed node answered, the slots are not
    all covered, or the nodes disagree (a failover under way)."""


def _cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    """The cluster client: ``options`` apply per node (redis-py's cluster client drops
    ``health_check_interval``: a dead connection fails its command, which is retried), and
    ``retry`` is the cluster client's own (it re-reads the map between attempts)."""
    parsed = cluster_url(url)
    seeds = [ClusterNode(host, port) for host, port in parsed.more_nodes]  # type: ignore[no-untyped-call]
    try:
        client = RedisCluster.from_url(parsed.url, startup_nodes=seeds, **options)
    except RedisClusterException as exc:
        raise unavailable(exc, "connect", "the Redis Cluster") from exc
    _map_failures_are_connection_errors(client.nodes_manager)
    return client


def _map_failures_are_connection_errors(nodes: NodesManager) -> None:
    """redis-py reports a cluster it cannot map with a bare :class:`RedisClusterException`,
    the class it also raises for misuse (TIME in a pipeline, a cross-slot transaction),
    which is a bug to let through. Every failure of the mapping step itself (re-run after
    connection errors and redirections, from commands and pipelines alike) means that the
    cluster cannot serve us now: it is raised as :class:`ClusterUnreachable`, a
    :class:`redis.ConnectionError`, which the client retries and :data:`UNAVAILABLE` names."""
    initialize = nodes.initialize

    @functools.wraps(initialize)
    def initialize_or_unreachable(*args: Any, **kwargs: Any) -> Any:
        try:
            return initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc

    nodes.initialize = initialize_or_unreachable  # type: ignore[method-assign]
