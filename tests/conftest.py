"""Shared fixtures: real services on loopback, per-test isolation, the emulator.

Integration tests need Redis and PostgreSQL. A missing service fails the test with a clear
message; it never skips, so CI cannot pass without them. Every test that uses one is marked
``integration`` here (``-m "not integration"`` runs the rest without any service). Tests
never FLUSHDB: each test gets its own key prefix and deletes only its own keys, so suites
may run side by side; tests that start Celery processes get a ``redis-server`` of their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fakeredis
import pytest
import redis

from tests.redis_server import RedisServer

# Fixture modules, registered here so that test modules use their fixtures without importing
# (or re-exporting) them.
pytest_plugins = [
    "tests.fixtures_emulator",
    "tests.storage_support",
    "tests.pipeline_support",
    "tests.cli_support",
]

REDIS_URL = os.environ.get("HIPCHAT_POLLER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_ADMIN_URL = os.environ.get(
    "HIPCHAT_POLLER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


# Fixtures that reach a real service, themselves or through the fixtures they use.
SERVICE_FIXTURES = frozenset({"real_redis", "postgres_url", "fresh_postgres", "redis_server"})
# Parametrized fixtures whose parameter picks a real service, which they then reach through
# request.getfixturevalue (so it is not among the test's fixture names).
SERVICE_PARAMS = {
    "any_redis": "redis",
    "db": "postgresql",
    "empty_db": "postgresql",
    "backend": "postgresql",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that uses a real Redis or PostgreSQL."""
    for item in items:
        if uses_a_service(item):
            item.add_marker(pytest.mark.integration)


def uses_a_service(item: pytest.Item) -> bool:
    if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return any(params.get(name) == value for name, value in SERVICE_PARAMS.items())


def _real_redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL} and is not answering: {exc}")
    return client


@pytest.fixture(autouse=True)
def _metrics_stay_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in this process (``worker`` with Celery faked, say) starts recording
    metrics in multiprocess mode (:func:`worker.metrics_process.start_recording`): the
    variable and ``prometheus_client``'s choice are put back after each test."""
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)


@pytest.fixture
def key_prefix() -> str:
    return f"hp-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def real_redis(key_prefix: str) -> Iterator[redis.Redis]:
    client = _real_redis()
    yield client
    for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(params=["fakeredis", "redis"])
def any_redis(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[redis.Redis]:
    """The same behaviour test against fakeredis (fast path) and real Redis."""
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
        return
    yield request.getfixturevalue("real_redis")


@contextmanager
def new_postgres_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database (a SQLAlchemy URL to it), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        pytest.fail(f"PostgreSQL is required at {POSTGRES_ADMIN_URL} and is not answering: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with new_postgres_database("hp_test") as url:
        yield url


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    """A PostgreSQL database of this test's own, for processes that must not share one."""
    with new_postgres_database("hp_fresh") as url:
        yield url


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A ``redis-server`` of the module's own, for tests that start Celery processes: their
    broker keys have fixed names, so they share a Redis with nothing else."""
    with RedisServer(tmp_path_factory.mktemp("redis-server")) as server:
        yield server
