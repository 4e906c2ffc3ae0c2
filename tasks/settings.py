"""The one typed settings object, read from ``HIPCHAT_POLLER_*`` environment variables.

It lives in ``tasks`` (not ``worker``) because imports flow worker -> tasks -> storage and
both the Celery tasks and the command line need it. Build it once with
:meth:`Settings.from_env` and pass it in; nothing reads the environment at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from storage.errors import ValidationError

PREFIX = "HIPCHAT_POLLER_"


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

    http_connect_timeout_seconds: float = 5.0
    http_read_timeout_seconds: float = 30.0
    history_page_size: int = 1000

    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_seconds: float = 2.0
    webhook_backoff_max_seconds: float = 600.0
    action_max_attempts: int = 10
    # A message a dead worker held comes back after this long (Redis broker). Longer than
    # the longest countdown: a budget reservation (15 min at most) or a webhook backoff.
    broker_visibility_timeout_seconds: float = 3600.0

    handlers_module: str | None = None
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            try:
                if kind.startswith("float"):
                    values[f.name] = float(raw)
                elif kind.startswith("int"):
                    values[f.name] = int(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                errors.append(f"{PREFIX}{f.name.upper()}: expected a number, got {raw!r}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if errors:
            raise ValidationError("bad settings: " + "; ".join(errors), errors)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        errors = []
        if self.poll_interval_seconds <= 0:
            errors.append("poll_interval_seconds must be > 0")
        if self.bucket_capacity < 1:
            errors.append("bucket_capacity must be >= 1")
        if self.bucket_window_seconds <= 0:
            errors.append("bucket_window_seconds must be > 0")
        if self.bucket_margin_seconds < 0:
            errors.append("bucket_margin_seconds must be >= 0")
        if not 1 <= self.history_page_size <= 1000:
            errors.append("history_page_size must be within 1..1000")
        if self.webhook_max_attempts < 1 or self.action_max_attempts < 1:
            errors.append("max attempts must be >= 1")
        if errors:
            raise ValidationError("bad settings: " + "; ".join(errors), errors)

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: broker and bucket run in this process."""
        return self.redis_url is None

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir) / 'hipchat-poller.db'}"

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
