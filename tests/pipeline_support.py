"""Fixtures shared by the pipeline tests (poll, delivery, scheduler, webhook); no tests here.

A pytest plugin (``pytest_plugins`` in ``tests/conftest.py``): test modules request the
fixtures by the ``name=`` given here and import only the helpers (``Pipeline``, ``ROOM``...).

* ``backend``: one storage pair per test, parametrized over SQLite + fakeredis and
  PostgreSQL + real Redis. It hands out :class:`Runtime` objects built from
  ``Settings(data_dir=tmp_path, secret_key=<fresh Fernet key>, redis_key_prefix=key_prefix)``
  whose ``redis`` is pre-set to the test's own client. PostgreSQL tests share the storage
  tests' migrated schema (``migrated_postgres_url``), whose tables are emptied before each
  test; Redis keys live under the test's ``key_prefix`` and are deleted afterwards.
* ``pipeline``: a backend plus an emulator (generous rate limit) with a room ``Dev`` and a
  connection ``main`` to it, and helpers to subscribe, poll and read the outbox.
* ``receiver``: a local HTTP server in a thread that records webhook requests and answers
  with scripted statuses.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from cryptography.fernet import Fernet
from sqlalchemy import select

from emulator import EmulatorServer
from storage import connections as conns
from storage import outbox, watermarks
from storage import subscriptions as subs
from storage.models import Connection, OutboxEvent, Subscription, Watermark
from storage.outbox import NewEvent
from tasks.budget import RedisLog
from tasks.connections_api import add_connection
from tasks.poll import PollResult, poll_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tasks.subscribe import SubscriptionSpec
from tasks.subscriptions_api import SubView, create_subscriptions
from tests.storage_support import emptied, opened, sqlite_url

BACKENDS = ["sqlite", "postgresql"]
CONN = "main"
ROOM = "Dev"
WAIT_SECONDS = 10.0


# -- storage backends -----------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    database_url: str
    redis: redis.Redis
    key_prefix: str
    data_dir: str
    secret_key: str = field(default_factory=lambda: Fernet.generate_key().decode())
    runtimes: list[Runtime] = field(default_factory=list)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "data_dir": self.data_dir,
            "secret_key": self.secret_key,
            "redis_key_prefix": self.key_prefix,
            # Tests poll one connection many times in a few seconds: the budget is tested
            # in test_bucket, not here.
            "bucket_capacity": 100_000,
        }
        values.update(overrides)
        return Settings(**values)

    def runtime(self, **overrides: Any) -> Runtime:
        rt = Runtime(self.settings(**overrides))
        self.adopt(rt)
        return rt

    def adopt(self, rt: Runtime) -> Runtime:
        """Give a Runtime built elsewhere (create_app) this backend's Redis client, for the
        budget too."""
        rt.redis = self.redis
        rt.budget = rt.budget_on(RedisLog(self.redis, rt.keys))
        self.runtimes.append(rt)
        return rt


@pytest.fixture(name="backend", params=BACKENDS)
def backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> Iterator[Backend]:
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
        with opened(url, migrate=True):
            pass
        found = Backend(
            "sqlite", url, fakeredis.FakeRedis(server=fakeredis.FakeServer()), key_prefix,
            str(tmp_path),
        )  # fmt: skip
        yield found
    else:
        url = request.getfixturevalue("migrated_postgres_url")
        client = request.getfixturevalue("real_redis")
        with emptied(url):
            pass
        found = Backend("postgresql", url, client, key_prefix, str(tmp_path))
        yield found
    for rt in found.runtimes:
        if "db" in rt.__dict__:
            rt.close()


# -- the emulator and the pipeline ----------------------------------------------------------


@dataclass
class Pipeline:
    """A connection ``main`` to an emulator, a room ``Dev``, and helpers around them."""

    backend: Backend
    rt: Runtime
    server: EmulatorServer
    conn_id: int
    token: str
    room_id: int
    alice: int = 2
    bob: int = 3

    @property
    def state(self) -> Any:
        return self.server.state

    def subscribe(
        self,
        event: str,
        *,
        room: str | None = ROOM,
        kind: str = "log",
        target: dict[str, Any] | None = None,
        filter: str | None = None,
        backfill: int = 0,
        name: str | None = None,
        include_own: bool = False,
    ) -> SubView:
        spec = SubscriptionSpec(
            connection=CONN,
            event=event,
            target_kind=kind,
            target=dict(target or {}),
            room=room,
            filter=filter,
            backfill=backfill,
            name=name,
            include_own=include_own,
        )
        return create_subscriptions(self.rt, [spec])[0]

    def poll(self, rt: Runtime | None = None, **kwargs: Any) -> PollResult:
        return poll_connection(rt or self.rt, self.conn_id, **kwargs)

    def events(self, sub_id: int | None = None) -> list[OutboxEvent]:
        with self.rt.db.session() as s:
            query = select(OutboxEvent).order_by(OutboxEvent.id)
            if sub_id is not None:
                query = query.where(OutboxEvent.subscription_id == sub_id)
            return list(s.scalars(query))

    def payloads(self, sub_id: int | None = None) -> list[dict[str, Any]]:
        return [e.payload for e in self.events(sub_id)]

    def add_events(self, sub_id: int, count: int, *, first: int = 0) -> list[int]:
        """Outbox events written directly (delivery tests need no poll to make them)."""
        made = [
            NewEvent(
                self.conn_id,
                sub_id,
                f"sub:{sub_id}:test-{i}",
                "room_message",
                {"event": "room_message", "n": i, "idempotency_key": f"sub:{sub_id}:test-{i}"},
            )
            for i in range(first, first + count)
        ]
        with self.rt.db.session() as s:
            return [row.id for row in outbox.add_events(s, made)]

    def event(self, event_id: int) -> OutboxEvent:
        with self.rt.db.session() as s:
            found = outbox.get_event(s, event_id)
            assert found is not None
            return found

    def watermark(self, room_id: int | None = None, stream: str = "history") -> Watermark | None:
        with self.rt.db.session() as s:
            return watermarks.get_watermark(
                s, self.conn_id, self.room_id if room_id is None else room_id, stream
            )

    def subscription(self, sub_id: int) -> Subscription:
        with self.rt.db.session() as s:
            found = subs.get_subscription(s, sub_id)
            assert found is not None
            return found

    def all_subscriptions(self) -> list[Subscription]:
        with self.rt.db.session() as s:
            return subs.list_subscriptions(s, self.conn_id)

    def connection(self) -> Connection:
        with self.rt.db.session() as s:
            found = conns.get_connection(s, self.conn_id)
            assert found is not None
            return found

    def say(self, text: str, user: int | None = None) -> dict[str, Any]:
        item: dict[str, Any] = self.state.post_message(ROOM, user or self.alice, text)
        return item

    def history_calls(self, room_id: int | None = None) -> int:
        rid = self.room_id if room_id is None else room_id
        return len(self.state.calls(path_prefix=f"/v2/room/{rid}/history"))


def make_pipeline(backend: Backend, server: EmulatorServer, **settings: Any) -> Pipeline:
    rt = backend.runtime(**settings)
    room = server.state.create_room(ROOM, topic="Dev talk")
    conn_id = add_connection(rt, CONN, server.base_url, server.admin_token).id
    return Pipeline(backend, rt, server, conn_id, server.admin_token, int(room["id"]))


@pytest.fixture(name="pipeline_emulator")
def pipeline_emulator_fixture(
    make_emulator: Callable[..., EmulatorServer],
) -> EmulatorServer:
    # The default (100 calls per 300 s per token) is HipChat's; these tests poll far more.
    return make_emulator(rate_limit=100_000, admin_token="emulator-admin-token-9f3c")


@pytest.fixture(name="pipeline")
def pipeline_fixture(backend: Backend, pipeline_emulator: EmulatorServer) -> Pipeline:
    return make_pipeline(backend, pipeline_emulator)


# -- a webhook receiver ---------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """Records every POST; answers with the next scripted status (default 200).

    ``hold()`` makes the next request wait inside the handler until ``release()``, so a test
    can look at the world while a delivery is in flight.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: list[int | tuple[int, dict[str, str]]] = []
        self.arrived = threading.Event()
        self._gate: threading.Event | None = None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    answer = receiver.statuses.pop(0) if receiver.statuses else 200
                    gate = receiver._gate
                receiver.arrived.set()
                if gate is not None:
                    gate.wait(WAIT_SECONDS)
                status, headers = answer if isinstance(answer, tuple) else (answer, {})
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def answer(self, *statuses: int | tuple[int, dict[str, str]]) -> None:
        with self._lock:
            self.statuses.extend(statuses)

    def hold(self) -> None:
        self._gate = threading.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()
