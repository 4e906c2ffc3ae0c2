"""The engine, the session scope, migrations, and the one place SQLAlchemy errors are translated.

Translation (every ``raise`` uses ``from`` the driver error)::

    OperationalError, InterfaceError,            -> StorageUnavailable  (retry later)
    pool TimeoutError, DisconnectionError
    missing table / column (not migrated)        -> NeedsAttention      (run the migrations)
    IntegrityError on one of our unique rules    -> ValidationError     (duplicate name, ...)
    other IntegrityError, DataError              -> ValidationError

Messages are composed here from what we know, never from SQL parameters: the engine is built
with ``hide_parameters=True`` so that not even a driver message can carry a value we bound.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import (
    Engine,
    PrimaryKeyConstraint,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import NeedsAttention, StorageUnavailable, ValidationError
from storage.models import Base

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
CHUNK = 500  # rows per multi-row statement: far below SQLite's and PostgreSQL's bind limits
# Any constant will do: it only has to be the same for every process running migrations.
_MIGRATION_LOCK_ID = 0x4869_7043_6861_74  # "HipChat"

_UNIQUE_MESSAGES = {
    "uq_connections_name": "a connection with this name already exists",
    "uq_connections_name_key": "a connection with this name already exists "
    "(names are not case-sensitive)",
    "uq_subscriptions_connection_id_name": "this connection already has a subscription "
    "with this name",
    "uq_outbox_events_idempotency_key": "an outbox event with this idempotency key exists",
}
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (?P<cols>[\w., ]+)")
_NOT_MIGRATED = re.compile(r"no such (table|column)|UndefinedTable|UndefinedColumn")


def _unique_constraint(error: exc.IntegrityError) -> str | None:
    """The name of the unique constraint an IntegrityError broke, or None if it was not one."""
    diag = getattr(error.orig, "diag", None)
    if diag is not None and getattr(error.orig, "sqlstate", None) == "23505":
        name = getattr(diag, "constraint_name", None)
        return str(name) if name else ""
    match = _SQLITE_UNIQUE.search(str(error.orig))
    if match is None:
        return None
    broken = [c.strip() for c in match["cols"].split(",")]
    for table in Base.metadata.tables.values():
        for constraint in table.constraints:
            if not isinstance(constraint, UniqueConstraint | PrimaryKeyConstraint):
                continue
            columns = [f"{table.name}.{c.name}" for c in constraint.columns]
            if columns == broken and constraint.name:
                return str(constraint.name)
    return ""


def translate(error: exc.SQLAlchemyError, duplicate: str | None = None) -> Exception:
    """Map a SQLAlchemy error onto the project's tree; programming errors are returned as-is.

    ``duplicate`` is the caller's message for a unique violation (it may name what the
    user typed); without it the message for the broken constraint is used.
    """
    if isinstance(error, exc.IntegrityError):
        constraint = _unique_constraint(error)
        if constraint is not None:
            message = duplicate or _UNIQUE_MESSAGES.get(constraint, "duplicate value")
            return ValidationError(message)
        return ValidationError(
            "refused by the database: a referenced row is missing or a value breaks a rule"
        )
    if isinstance(error, exc.DataError):
        return ValidationError("refused by the database: a value does not fit its column")
    text = str(getattr(error, "orig", None) or error)
    if isinstance(error, exc.DBAPIError) and _NOT_MIGRATED.search(
        f"{type(error.orig).__name__} {text}"
    ):
        return NeedsAttention("the database schema is missing or out of date: run the migrations")
    if isinstance(
        error,
        exc.OperationalError | exc.InterfaceError | exc.TimeoutError | exc.DisconnectionError,
    ):
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return StorageUnavailable(f"database unavailable: {first_line}")
    return error


@contextmanager
def translated(duplicate: str | None = None) -> Iterator[None]:
    """Run a block, translating SQLAlchemy errors raised in it (see :func:`translate`)."""
    try:
        yield
    except exc.SQLAlchemyError as error:
        mapped = translate(error, duplicate)
        if mapped is error:
            raise
        raise mapped from error


class Database:
    """One engine per process. ``session()`` is the unit of work; ``upgrade()`` migrates."""

    def __init__(self, url: str, **engine_options: Any) -> None:
        self.url = make_url(url)
        self.engine = self._create_engine(engine_options)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        readonly = self.engine.execution_options(hipchat_readonly=True)
        if self.dialect == "postgresql":
            # A read is its statements alone: no BEGIN and no COMMIT round trips (each
            # statement sees committed data; the readers do not need one snapshot).
            readonly = readonly.execution_options(isolation_level="AUTOCOMMIT")
        self._readonly = sessionmaker(readonly, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _create_engine(self, options: dict[str, Any]) -> Engine:
        options.setdefault("hide_parameters", True)
        if self.url.get_backend_name() != "sqlite":
            # No pre-ping (a round trip per checkout): a connection the server dropped fails
            # its first statement instead, is thrown away, and the unit of work is retried
            # once (see session(retry_disconnect=True)) or by its task.
            return create_engine(self.url, **options)
        connect_args = options.setdefault("connect_args", {})
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(self.url, **options)
        event.listen(engine, "do_connect", _sqlite_make_directory)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A session whose transaction commits when the block ends and rolls back on error.

        ``readonly``: the block only reads (on SQLite it then takes no write lock)."""
        sessions = self._readonly if readonly else self._sessions
        with translated(), sessions() as session, session.begin():
            yield session

    def read(self, unit: Callable[[Session], T]) -> T:
        """Run a read-only unit of work; once more if the server had dropped the pooled
        connection it was given (a restarted PostgreSQL), which pre-ping would have caught."""
        with translated():
            try:
                with self._readonly() as session, session.begin():
                    return unit(session)
            except exc.DBAPIError as error:
                if not error.connection_invalidated:
                    raise
            with self._readonly() as session, session.begin():
                return unit(session)

    def upgrade(self, revision: str = "head") -> None:
        """Migrate to ``revision``; safe to run again and from several processes at once.

        A SQLite file's directory is created on the first connection (any, not only here).
        """
        with translated(), self.engine.begin() as connection:
            if self.dialect == "postgresql":
                # Two workers starting together must not both create the tables.
                connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK_ID)))
            config = alembic_config()
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, revision)
            except CommandError as error:  # e.g. the database is newer than this code
                raise NeedsAttention(f"cannot migrate the database: {error}") from error

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at; None for an empty database."""
        with translated(), self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config() -> Config:
    """An Alembic config that finds the migrations inside the installed package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def dialect_insert(s: Session) -> Callable[[type[Base]], Any]:
    """The session dialect's ``insert``, which has ``on_conflict_do_nothing/do_update``."""
    if s.get_bind().dialect.name == "postgresql":
        return postgresql.insert
    return sqlite.insert


def upsert(s: Session, model: type[Base], rows: list[dict[str, Any]], keys: list[str]) -> None:
    """Insert rows, or overwrite the other columns of rows whose ``keys`` already exist."""
    if not rows:
        return
    insert = dialect_insert(s)
    for part in chunks(rows):
        statement = insert(model).values(part)
        changed = {c: statement.excluded[c] for c in rows[0] if c not in keys}
        s.execute(statement.on_conflict_do_update(index_elements=keys, set_=changed))


def chunks(values: list[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    """Slices small enough for any backend's limit on bound parameters."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _sqlite_make_directory(dialect: Any, _record: Any, cargs: list[Any], _cparams: Any) -> None:
    # The embedded default lives in a data directory that may not exist on a first run.
    database = str(cargs[0]) if cargs else ""
    if database and database != ":memory:" and not database.startswith("file:"):
        # If this fails, sqlite3's own error follows and is translated like any other.
        with contextlib.suppress(OSError):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_on_begin): the sqlite3 module's legacy
    # transaction control skips BEGIN before SELECT and SAVEPOINT, which breaks both.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    if connection.get_execution_options().get("hipchat_readonly"):
        connection.exec_driver_sql("BEGIN")  # a reader waits for no writer (WAL)
        return
    # IMMEDIATE takes the write lock up front. A deferred transaction that reads and then
    # writes fails at once with SQLITE_BUSY if another writer committed in between, and
    # busy_timeout cannot help it; almost every transaction of ours writes.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
