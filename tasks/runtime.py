"""Everything a task needs at run time, built lazily once per process from the settings.

Celery's prefork pool forks after the app is created, and neither Redis connections nor
SQLAlchemy engines survive a fork, so each piece is built on first use in the process that
uses it and rebuilt if the process id changed.
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import Any

import redis
import requests

from storage.crypto import TokenCipher, load_or_create_key
from storage.db import Database
from tasks.budget import SlidingLogBudget
from tasks.client import HipChatClient
from tasks.hipchat_types import RateLimitInfo
from tasks.keys import Keys
from tasks.lease import Leases
from tasks.redis_conn import connect
from tasks.settings import Settings

_ATTR = "hipchat_runtime"


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self._lock = threading.Lock()

    # -- wiring -------------------------------------------------------------------------
    @classmethod
    def attach(cls, app: Any, settings: Settings) -> Runtime:
        runtime = cls(settings)
        setattr(app, _ATTR, runtime)
        return runtime

    @classmethod
    def of(cls, app: Any) -> Runtime:
        runtime: Runtime | None = getattr(app, _ATTR, None)
        if runtime is None:
            raise RuntimeError("this Celery app was not built by worker.app.create_app")
        if runtime.pid != os.getpid():  # forked: start over with fresh connections
            runtime = cls.attach(app, runtime.settings)
        return runtime

    # -- pieces ---------------------------------------------------------------------------
    @cached_property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_key_prefix)

    @cached_property
    def redis(self) -> redis.Redis:
        return connect(self.settings)

    @cached_property
    def db(self) -> Database:
        with self._lock:
            return Database(self.settings.effective_database_url)

    @cached_property
    def cipher(self) -> TokenCipher:
        key = self.settings.secret_key or load_or_create_key(self.settings.data_dir)
        return TokenCipher(key)

    @cached_property
    def budget(self) -> SlidingLogBudget:
        return SlidingLogBudget(
            self.redis,
            self.keys,
            capacity=self.settings.bucket_capacity,
            window_seconds=self.settings.bucket_window_seconds,
        )

    @cached_property
    def http(self) -> requests.Session:
        """Pooled session for webhook deliveries (HipChat calls use HipChatClient)."""
        return requests.Session()

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.redis, self.keys)

    def client(self, connection_id: int, base_url: str, token: str) -> HipChatClient:
        """A client whose every request first takes a token from the connection's budget."""

        def before_request() -> None:
            self.budget.acquire(connection_id)

        def on_rate_limit(info: RateLimitInfo) -> None:
            self.budget.observe(connection_id, remaining=info.remaining, reset_at=info.reset_at)

        return HipChatClient(
            base_url,
            token,
            timeout=(
                self.settings.http_connect_timeout_seconds,
                self.settings.http_read_timeout_seconds,
            ),
            before_request=before_request,
            on_rate_limit=on_rate_limit,
            page_size=self.settings.history_page_size,
        )
