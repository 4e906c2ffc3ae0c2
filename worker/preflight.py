"""Before ``run``, ``worker`` and ``beat`` start: can this process reach what it needs?

Celery retries a broker it cannot reach for ever, and a worker whose database is down fails
task after task; either way nobody reads why among thousands of log lines. So at start each
long-running command checks, with short timeouts, in this order, and stops at the first
failure with one line (exit 1: a service a person must start or fix):

* Redis (``REDIS_URL``: budgets, leases, locks, and the broker unless ``BROKER_URL`` says
  otherwise) answers a PING;
* a separate ``BROKER_URL`` accepts a connection;
* the database accepts a connection and has this code's schema (:mod:`worker.schema_check`);
  ``run`` on embedded defaults (the only process) creates or upgrades it instead.

It also says (as warnings, the caller prints them) what works but will hurt: a Redis without
persistence (:func:`persistence_warning`).

A check takes a few seconds at most, never the operating system's TCP timeout of minutes.
Messages name hosts and ports, never the passwords a URL may carry. kombu's errors are
translated here, the one place the project meets them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from kombu.connection import Connection as BrokerConnection
from kombu.exceptions import KombuError
from redis.cluster import RedisCluster
from sqlalchemy.engine import make_url

from storage.db import Database
from storage.errors import StorageUnavailable
from tasks.redis_conn import redis_errors
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker.schema_check import check_schema

CONNECT_TIMEOUT_SECONDS = 3


def services_ready(settings: Settings, *, upgrade: bool = False) -> list[str]:
    """Raise :class:`StorageUnavailable` (or the schema check's error) unless Redis, the
    broker and the database answer; ``upgrade`` migrates the schema instead of checking it.
    Returns warnings for a person: what works, but will hurt."""
    warnings: list[str] = []
    rt = Runtime(settings)
    if settings.database_url and make_url(settings.database_url).get_backend_name() in (
        "postgresql",
    ):
        rt.db = Database(
            settings.database_url, connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        )
    try:
        if settings.redis_url is not None:
            with redis_errors("PING", "start-up"):
                rt.redis.ping()
            warnings += [w for w in [persistence_warning(rt.redis)] if w]
        if settings.broker_url and settings.broker_url != settings.redis_url:
            _broker_ready(settings.broker_url)
        if upgrade:
            rt.db.upgrade()
        else:
            check_schema(rt)
    finally:
        rt.db.dispose()
    return warnings


def persistence_warning(client: redis.Redis | RedisCluster) -> str | None:
    """A warning when Redis keeps nothing across a restart (no AOF, no RDB save points): the
    queued tasks and the budgets' logs would go with it. Nothing is lost for good (the relay
    sends outbox events again, a lost budget refuses one window to keep the ceiling), but
    every restart costs a window of polling and a burst of redeliveries. A managed Redis that
    refuses CONFIG says nothing here: its durability is its provider's."""
    if isinstance(client, RedisCluster):  # every primary holds some connections' budgets
        nodes = [node.redis_connection for node in client.get_primaries()]  # type: ignore[no-untyped-call]
        found = [w for w in (persistence_warning(n) for n in nodes if n is not None) if w]
        return found[0] if found else None
    try:
        config = client.config_get("appendonly") | client.config_get("save")
    except redis.RedisError:
        return None
    if config.get("appendonly") == "yes" or str(config.get("save", "")).strip():
        return None
    return (
        "Redis has no persistence (appendonly no, no save points): a restart loses queued "
        "tasks (the relay sends their events again) and the call budgets (each connection "
        "then waits one window); run it with --appendonly yes"
    )


def _broker_ready(url: str) -> None:
    try:
        # kombu's Connection has no type hints.
        connection = BrokerConnection(url, connect_timeout=CONNECT_TIMEOUT_SECONDS)  # type: ignore[no-untyped-call]
        with connection as broker:
            broker.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except (KombuError, OSError) as exc:
        raise StorageUnavailable(f"the broker at {_where(url)} cannot be reached: {exc}") from exc


def _where(url: str) -> str:
    """``scheme://host:port``: a URL without its userinfo, path and query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"
