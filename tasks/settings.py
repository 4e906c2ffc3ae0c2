"""The one typed settings object, read from ``HIPCHAT_POLLER_*`` environment variables.

It lives in ``tasks`` (not ``worker``) because imports flow worker -> tasks -> storage and
both the Celery tasks and the command line need it. Build it once with
:meth:`Settings.from_env` and pass it in; nothing reads the environment at import time.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from storage.errors import ValidationError

PREFIX = "HIPCHAT_POLLER_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HIPCHAT_CALLS = 100  # HipChat's own limit: calls per token ...
HIPCHAT_WINDOW = 60.0  # ... in this many seconds
MAX_INTERVAL_SECONDS = 86_400.0  # a poll, relay or retry wait of a day is already a mistake
DATABASES = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB"
REDIS_SCHEMES = ("redis", "rediss", "unix")
# A Redis Cluster: the scheme says so, and maps to the plain scheme of its nodes.
REDIS_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
REDIS_CLUSTER_URL = "redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]"
NOT_A_CLUSTER_BROKER = (
    "Celery's broker cannot be a Redis Cluster: use a single Redis (redis://) or RabbitMQ (amqp://)"
)


def _default_data_dir() -> str:
    return str(Path.home() / ".local" / "share" / "hipchat-poller")


@dataclass(frozen=True, slots=True)
class Settings:
    # Where state lives. None means the embedded default (SQLite file / in-process fakeredis).
    database_url: str | None = None
    redis_url: str | None = None
    broker_url: str | None = None  # defaults to redis_url; embedded: in-process memory broker
    data_dir: str = field(default_factory=_default_data_dir)
    # Fernet key (urlsafe base64, 32 bytes) encrypting tokens at rest. Embedded default:
    # a key file created in data_dir with mode 0600.
    secret_key: str | None = None
    redis_key_prefix: str = "hipchat-poller"

    poll_interval_seconds: float = 60.0
    bucket_capacity: int = 100
    bucket_window_seconds: float = 60.0
    # Kept on top of the window: HipChat stamps a call when it arrives, a little after the
    # budget granted it (see tasks.budget).
    bucket_margin_seconds: float = 1.0
    # A drain lost with a worker killed mid-delivery is sent again within about
    # interval + min age (its lock frees in 10 s): every pending event arrives within 30 s.
    relay_interval_seconds: float = 10.0
    relay_min_age_seconds: float = 15.0
    outbox_retention_days: float = 7.0  # delivered and dead events are purged after this

    http_connect_timeout_seconds: float = 5.0
    http_read_timeout_seconds: float = 30.0
    history_page_size: int = 1000

    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 2.0
    webhook_backoff_max_seconds: float = 600.0
    action_max_attempts: int = 10
    # A message a dead worker held comes back after this long, plus up to 10 s (Redis broker,
    # worker.app.RESTORE_INTERVAL_SECONDS). Longer than the longest countdown: a budget
    # reservation (15 min at most) or a webhook backoff.
    broker_visibility_timeout_seconds: float = 3600.0

    handlers_module: str | None = None
    log_level: str = "INFO"
    # Beat touches this file every few seconds while it ticks and reaches the broker: a
    # container healthcheck reads its age (docker-compose.yml). None: no file.
    beat_heartbeat_file: str | None = None
    # Prometheus' multiprocess files of the processes that record metrics (worker, beat, run),
    # one directory per process group (worker.metrics_process). None: DATA_DIR/metrics.
    metrics_dir: str | None = None
    # Connections whose budget and health `hipchat-poller metrics` reports one by one, per
    # scrape (the lowest ids); the totals cover every connection.
    metrics_max_connections: int = 500

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read, parse and validate the settings; a :class:`ValidationError` lists every
        problem (and names the variables, never their values when they may hold a secret)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in fields(cls):
            name = PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            try:
                raw.encode("utf-8")
                if kind.startswith("float"):
                    values[f.name] = float(raw)
                elif kind.startswith("int"):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = raw
            except UnicodeEncodeError:
                errors.append(f"{name} is not valid UTF-8 text")
            except ValueError:
                errors.append(f"{name}: expected a number, got {raw!r}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if errors:
            raise ValidationError("bad settings: " + "; ".join(errors), errors)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Every number finite and within its range, URLs of a kind this code can use."""
        errors = [
            f"{PREFIX}{name.upper()} must be {rule} (got {getattr(self, name)!r})"
            for name, ok, rule in _RULES
            if not _finite(getattr(self, name)) or not ok(self)
        ]
        errors += _url_errors(self)
        if self.log_level.upper() not in LOG_LEVELS:
            errors.append(f"{PREFIX}LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        if errors:
            raise ValidationError("bad settings: " + "; ".join(errors), errors)

    def warnings(self) -> list[str]:
        """Settings that work but that HipChat will punish; for a person to read at start."""
        if self.bucket_capacity > HIPCHAT_CALLS or self.bucket_window_seconds < HIPCHAT_WINDOW:
            return [
                f"{PREFIX}BUCKET_CAPACITY={self.bucket_capacity} per "
                f"{PREFIX}BUCKET_WINDOW_SECONDS={self.bucket_window_seconds:g} allows more than "
                f"HipChat's {HIPCHAT_CALLS} calls per {HIPCHAT_WINDOW:g} s: expect 429s"
            ]
        return []

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: broker and bucket run in this process."""
        return self.redis_url is None

    @property
    def redis_cluster(self) -> bool:
        """True when ``redis_url`` names a Redis Cluster (``redis+cluster://``)."""
        return self.redis_url is not None and _is_cluster(self.redis_url)

    @property
    def effective_metrics_dir(self) -> str:
        return self.metrics_dir or str(Path(self.data_dir) / "metrics")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir) / 'hipchat-poller.db'}"

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _finite(value: object) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _seconds(name: str) -> tuple[str, Callable[[Settings], bool], str]:
    def ok(settings: Settings) -> bool:
        return 0 < float(getattr(settings, name)) <= MAX_INTERVAL_SECONDS

    return name, ok, f"a number of seconds above 0 and at most {MAX_INTERVAL_SECONDS:g}"


# (field, its rule, the rule in words). Every float must also be finite (no nan, no inf).
_RULES: tuple[tuple[str, Callable[[Settings], bool], str], ...] = (
    _seconds("poll_interval_seconds"),
    ("bucket_capacity", lambda s: s.bucket_capacity >= 1, "at least 1"),
    _seconds("bucket_window_seconds"),
    (
        "bucket_margin_seconds",
        lambda s: 0 <= s.bucket_margin_seconds <= MAX_INTERVAL_SECONDS,
        f"a number of seconds within 0..{MAX_INTERVAL_SECONDS:g}",
    ),
    _seconds("relay_interval_seconds"),
    (
        "relay_min_age_seconds",
        lambda s: 0 <= s.relay_min_age_seconds <= MAX_INTERVAL_SECONDS,
        f"a number of seconds within 0..{MAX_INTERVAL_SECONDS:g}",
    ),
    ("outbox_retention_days", lambda s: s.outbox_retention_days > 0, "a number of days > 0"),
    _seconds("http_connect_timeout_seconds"),
    _seconds("http_read_timeout_seconds"),
    ("history_page_size", lambda s: 1 <= s.history_page_size <= 1000, "within 1..1000"),
    _seconds("webhook_timeout_seconds"),
    ("webhook_max_attempts", lambda s: s.webhook_max_attempts >= 1, "at least 1"),
    _seconds("webhook_backoff_base_seconds"),
    (
        "webhook_backoff_max_seconds",
        lambda s: s.webhook_backoff_base_seconds <= s.webhook_backoff_max_seconds,
        "at least WEBHOOK_BACKOFF_BASE_SECONDS",
    ),
    ("action_max_attempts", lambda s: s.action_max_attempts >= 1, "at least 1"),
    ("metrics_max_connections", lambda s: s.metrics_max_connections >= 0, "at least 0"),
    (
        "broker_visibility_timeout_seconds",
        lambda s: s.broker_visibility_timeout_seconds > 0,
        "a number of seconds above 0",
    ),
)


def _scheme(url: str) -> str | None:
    """The scheme of ``url`` (``postgresql+psycopg``), or None when it is not a URL."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        return None
    return scheme.lower() if scheme and "://" in url else None


def _url_errors(settings: Settings) -> list[str]:
    """URLs may hold passwords: a message names the variable and the scheme, never the URL."""
    errors = []
    if settings.database_url is not None:
        scheme = _scheme(settings.database_url)
        if scheme is None:
            errors.append(f"{PREFIX}DATABASE_URL is not a URL; use {DATABASES}")
        elif scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
            errors.append(f"{PREFIX}DATABASE_URL: write postgresql+psycopg:// (psycopg 3)")
        elif scheme not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
            errors.append(f"{PREFIX}DATABASE_URL: {scheme} is not supported; use {DATABASES}")
    if settings.redis_url is not None:
        errors += _redis_url_errors(settings.redis_url)
    broker = settings.broker_url
    if broker is not None and _is_cluster(broker):
        errors.append(f"{PREFIX}BROKER_URL: {NOT_A_CLUSTER_BROKER}")
    elif broker is not None and _scheme(broker) is None:
        errors.append(f"{PREFIX}BROKER_URL must be a URL such as redis://HOST:PORT/DB")
    elif broker is None and settings.redis_cluster:
        errors.append(
            f"{PREFIX}BROKER_URL must be set when {PREFIX}REDIS_URL is a Redis Cluster: "
            f"{NOT_A_CLUSTER_BROKER}"
        )
    return errors


def _is_cluster(url: str) -> bool:
    # Not urlsplit: a list of nodes with an IPv6 address in brackets is no URL it accepts.
    return url.partition("://")[0].lower() in REDIS_CLUSTER_SCHEMES


def _redis_url_errors(url: str) -> list[str]:
    if _is_cluster(url):
        try:
            cluster_url(url)
        except ValueError as exc:
            return [f"{PREFIX}REDIS_URL: {exc}"]
        return []
    if _scheme(url) not in REDIS_SCHEMES:
        return [
            f"{PREFIX}REDIS_URL must be redis://HOST:PORT/DB (or rediss://, unix://; "
            f"{REDIS_CLUSTER_URL} for a Redis Cluster)"
        ]
    return []


@dataclass(frozen=True, slots=True)
class ClusterURL:
    """A Redis Cluster URL taken apart: ``url`` is its first seed node as the plain URL
    redis-py reads (credentials, TLS and query options go with it), ``more_nodes`` the
    other seed nodes. Any one seed node that answers is enough: the client learns the rest
    of the cluster from it (``CLUSTER SLOTS``)."""

    url: str
    more_nodes: tuple[tuple[str, int], ...]


_NODE = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]/@,]+)(?::(?P<port>[0-9]{1,5}))?")


def cluster_url(url: str) -> ClusterURL:
    """Parse ``redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/0][?OPTIONS]``
    (``rediss+cluster://`` for TLS; a port defaults to 6379). A :class:`ValueError` says
    what is wrong without quoting the URL, which may hold a password."""
    scheme, _, rest = url.partition("://")
    plain = REDIS_CLUSTER_SCHEMES.get(scheme.lower())
    if plain is None:
        raise ValueError(f"not a Redis Cluster URL; use {REDIS_CLUSTER_URL}")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:end], rest[end:]
    userinfo, at, hosts = netloc.rpartition("@")
    nodes = []
    for node in hosts.split(","):
        found = _NODE.fullmatch(node)
        port = int(found["port"] or 6379) if found else 0
        if found is None or not 0 < port < 65536:
            raise ValueError(f"name the cluster's nodes as {REDIS_CLUSTER_URL}")
        nodes.append((found["host"], port))
    path = tail.partition("?")[0]
    if path not in ("", "/", "/0") or "#" in tail:
        raise ValueError("a Redis Cluster has database 0 only: end the URL with /0 or nothing")
    (host, port), *more = nodes
    first = f"{plain}://{userinfo}{at}{host}:{port}{tail}"
    return ClusterURL(first, tuple((h.strip("[]"), p) for h, p in more))
