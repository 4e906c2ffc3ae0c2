"""Fixtures shared by the storage and pipeline tests (no tests here).

Every behaviour test runs against SQLite (a fresh file under tmp_path) and PostgreSQL.
PostgreSQL tests use schemas in the session's database (``search_path`` set through the
URL): the ``db`` tests share one migrated schema whose tables are emptied before each test
(migrating per test made DDL most of the run time); ``empty_db`` tests get a schema of their
own, created empty and dropped afterwards. Either way no test sees another's rows.

A pytest plugin (``pytest_plugins`` in ``tests/conftest.py``): test modules request the
fixtures by the ``name=`` given here and import only the helpers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from storage import connections, subscriptions
from storage.crypto import TokenCipher, generate_key
from storage.db import Database
from storage.models import Base, Connection, Subscription

BACKENDS = ["sqlite", "postgresql"]


def _admin(postgres_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        postgres_url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True
    )


def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'hipchat-poller.db'}"


@contextmanager
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A URL to a new empty schema of the test database; the schema is dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with _admin(postgres_url) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{postgres_url}?options=-csearch_path%3D{schema}"
    finally:
        with _admin(postgres_url) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def opened(url: str, *, migrate: bool = False) -> Iterator[Database]:
    database = Database(url)
    try:
        if migrate:
            database.upgrade()
        yield database
    finally:
        database.dispose()


@pytest.fixture(name="migrated_postgres_url", scope="session")
def migrated_postgres_url_fixture(postgres_url: str) -> Iterator[str]:
    """One schema migrated to head, shared by the ``db`` and ``pg_db`` tests."""
    with postgres_schema(postgres_url) as url, opened(url, migrate=True):
        yield url


@pytest.fixture(name="empty_db", params=BACKENDS)
def empty_db_fixture(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    """A Database on an empty database (not migrated): for the migration tests."""
    if request.param == "sqlite":
        with opened(sqlite_url(tmp_path)) as database:
            yield database
        return
    with postgres_schema(request.getfixturevalue("postgres_url")) as url, opened(url) as database:
        yield database


@pytest.fixture(name="pg_db")
def pg_db_fixture(migrated_postgres_url: str) -> Iterator[Database]:
    """A migrated, emptied PostgreSQL Database, for what only PostgreSQL does (SKIP LOCKED)."""
    with emptied(migrated_postgres_url) as database:
        yield database


@pytest.fixture(name="db", params=BACKENDS)
def db_fixture(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
    """A Database migrated to head, holding no rows."""
    if request.param == "sqlite":
        with opened(sqlite_url(tmp_path), migrate=True) as database:
            yield database
        return
    with emptied(request.getfixturevalue("migrated_postgres_url")) as database:
        yield database


@contextmanager
def emptied(migrated_url: str) -> Iterator[Database]:
    """The shared migrated schema with every table emptied (before the test, so a test that
    failed half-way cannot leave rows behind for the next)."""
    with opened(migrated_url) as database:
        # DELETE, not TRUNCATE: TRUNCATE recreates every table's files, ten times slower here.
        with database.engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
        yield database


@pytest.fixture(name="cipher")
def cipher_fixture() -> TokenCipher:
    return TokenCipher(generate_key())


@pytest.fixture(name="conn")
def conn_fixture(db: Database, cipher: TokenCipher) -> Connection:
    with db.session() as s:
        return connections.add_connection(s, "main", "https://hipchat.example", "tok-1", cipher)


@pytest.fixture(name="sub")
def sub_fixture(db: Database, conn: Connection) -> Subscription:
    with db.session() as s:
        return subscriptions.add_subscription(
            s, conn.id, "room_message", room="Dev", target_kind="log", target={}
        )
