"""The Redis client factory, the one place redis-py errors are translated, and Lua loading.

The client factory: a real client from ``settings.redis_url``, or in embedded mode
(no URL) an in-process fakeredis client on the one :func:`embedded_server` of this process.

Every client of one process shares the embedded server, so the budget, the leases and the
broker see the same data. Processes do not share it: embedded mode is for one process (tests,
demos, ``--pool=solo`` or threads), never for several workers.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files

import fakeredis
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from storage.errors import StorageUnavailable
from tasks.settings import Settings

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
UNAVAILABLE: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError,  # includes BusyLoadingError, AuthenticationError
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # failover: we reached a replica
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
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


def unavailable(exc: redis.RedisError, action: str, about: str) -> StorageUnavailable:
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


def connect(settings: Settings) -> redis.Redis:
    """A Redis client for ``settings``; bytes in, bytes out (``decode_responses=False``)."""
    if settings.redis_url is None:
        return fakeredis.FakeRedis(server=embedded_server(), decode_responses=False)
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=SOCKET_CONNECT_TIMEOUT_SECONDS,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        health_check_interval=HEALTH_CHECK_INTERVAL_SECONDS,
        decode_responses=False,
        retry=Retry(
            ExponentialWithJitterBackoff(
                base=RETRY_BACKOFF_BASE_SECONDS, cap=RETRY_BACKOFF_CAP_SECONDS
            ),
            retries=RETRIES,
        ),
    )
