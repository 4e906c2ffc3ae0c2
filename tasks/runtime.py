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

import requests

from storage.crypto import TokenCipher, load_or_create_key
from storage.db import Database
from tasks.budget import Gate, LogBackend, RedisLog, SlidingLogBudget
from tasks.budget_sqlite import SqliteLog
from tasks.client import HipChatClient
from tasks.client_http import new_session
from tasks.health import HealthBook
from tasks.keys import Keys
from tasks.lease import Leases
from tasks.posts import Posts, RedisPosts, SqlitePosts
from tasks.redis_conn import RedisClient, connect
from tasks.settings import Settings
from tasks.shared_file import SharedFile

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

    def close(self) -> None:
        """Write pending health records and close the database's connections (the pieces not
        built yet are left alone)."""
        if "health" in self.__dict__:
            self.health.stop()
        if "db" in self.__dict__:
            self.db.dispose()

    # -- pieces ---------------------------------------------------------------------------
    @cached_property
    def keys(self) -> Keys:
        return Keys(self.settings.redis_key_prefix)

    @cached_property
    def redis(self) -> RedisClient:
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
        """Redis with Redis configured; else the data directory's SQLite file, shared by
        every process of the embedded mode (run, the action commands, the Python API)."""
        if self.settings.embedded:
            return self.budget_on(SqliteLog(self.shared_file))
        return self.budget_on(RedisLog(self.redis, self.keys))

    @cached_property
    def shared_file(self) -> SharedFile:
        """The embedded mode's state shared by its processes (unused with Redis)."""
        return SharedFile(self.settings.data_dir)

    @cached_property
    def posts(self) -> Posts:
        """What each connection posted: intents and own posts (tasks.posts)."""
        if self.settings.embedded:
            return SqlitePosts(self.shared_file)
        return RedisPosts(self.redis, self.keys)

    def budget_on(self, backend: LogBackend) -> SlidingLogBudget:
        return SlidingLogBudget(
            backend,
            capacity=self.settings.bucket_capacity,
            window_seconds=self.settings.bucket_window_seconds,
            margin_seconds=self.settings.bucket_margin_seconds,
        )

    @cached_property
    def health(self) -> HealthBook:
        """The health records of this process's polls, written in batches."""
        return HealthBook(self.db)

    @cached_property
    def http(self) -> requests.Session:
        """This process's pooled HTTP session, for HipChat calls and webhook deliveries alike:
        connections stay open from one poll to the next (and keep their TLS session)."""
        return new_session()

    @cached_property
    def leases(self) -> Leases:
        return Leases(self.redis, self.keys)

    def client(
        self, connection_id: int, base_url: str, token: str, *, prepaid: int = 0
    ) -> HipChatClient:
        """A client whose every request first passes the connection's budget (``prepaid``
        calls were already taken or reserved by the caller)."""
        gate = Gate(self.budget, connection_id, prepaid)
        return HipChatClient(
            base_url,
            token,
            timeout=(
                self.settings.http_connect_timeout_seconds,
                self.settings.http_read_timeout_seconds,
            ),
            session=self.http,
            before_request=gate.before_call,
            on_rate_limit=gate.observe,
            on_refused=gate.refused,
            page_size=self.settings.history_page_size,
        )
