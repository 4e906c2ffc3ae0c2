"""storage.db: migrations, sessions, SQLite setup, aware datetimes, error translation."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import StatementError

from storage import connections, watermarks
from storage.crypto import TokenCipher
from storage.db import Database, alembic_config, head_revision
from storage.errors import NeedsAttention, StorageUnavailable, ValidationError
from storage.models import Base, Connection, Watermark

TABLES = {
    "alembic_version",
    "connections",
    "known_participants",
    "known_rooms",
    "outbox_events",
    "subscriptions",
    "watermarks",
    "connection_health",
}


def test_upgrade_from_empty_then_again_is_a_no_op(empty_db: Database) -> None:
    assert empty_db.current_revision() is None
    empty_db.upgrade()
    assert empty_db.current_revision() == head_revision() == "0005"
    assert set(inspect(empty_db.engine).get_table_names()) == TABLES
    empty_db.upgrade()
    assert empty_db.current_revision() == "0005"


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_to_empty_and_up_again(empty_db: Database) -> None:
    empty_db.upgrade()
    config = alembic_config()
    with empty_db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
    assert set(inspect(empty_db.engine).get_table_names()) <= {"alembic_version"}
    assert empty_db.current_revision() is None
    empty_db.upgrade()
    assert set(inspect(empty_db.engine).get_table_names()) == TABLES


def test_concurrent_upgrades_both_succeed(empty_db: Database) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def upgrade() -> None:
        barrier.wait()
        try:
            empty_db.upgrade()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert empty_db.current_revision() == "0005"


def test_sqlite_upgrade_creates_the_parent_directory_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.db"
    database = Database(f"sqlite:///{path}")
    try:
        database.upgrade()
        assert path.exists()
        assert database.dialect == "sqlite"
        with database.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
    finally:
        database.dispose()


def test_session_commits_or_rolls_back(db: Database, cipher: TokenCipher) -> None:
    def add_then_fail() -> None:
        with db.session() as s:
            connections.add_connection(s, "gone", "https://h.example", "t", cipher)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        add_then_fail()
    with db.session() as s:
        connections.add_connection(s, "kept", "https://h.example", "t", cipher)
    with db.session() as s:
        assert [c.name for c in connections.list_connections(s)] == ["kept"]


@pytest.mark.parametrize("offset_hours", [0, 2, -7])
def test_datetimes_round_trip_as_aware_utc(
    db: Database, conn: Connection, offset_hours: int
) -> None:
    moment = datetime(
        2024, 3, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=offset_hours))
    )
    with db.session() as s:
        watermarks.advance_watermark(s, conn.id, 5, "history", "m1", moment)
    with db.session() as s:
        row = s.scalars(select(Watermark)).one()
        assert row.last_date == moment
        assert row.last_date.tzinfo is UTC
        assert row.updated_at.tzinfo is UTC
        found = s.get(Connection, conn.id)
        assert found is not None
        assert found.created_at.tzinfo is UTC


def test_naive_datetimes_are_refused(db: Database, conn: Connection) -> None:
    with pytest.raises(StatementError, match="naive datetime"), db.session() as s:
        watermarks.advance_watermark(s, conn.id, 5, "history", "m1", datetime(2024, 1, 1))


def test_datetime_comparisons_use_utc_on_both_backends(db: Database, conn: Connection) -> None:
    plus_two = timezone(timedelta(hours=2))
    with db.session() as s:
        watermarks.advance_watermark(
            s, conn.id, 5, "history", "m1", datetime(2024, 1, 1, 12, tzinfo=UTC)
        )
        # 13:00+02:00 is 11:00 UTC: older, so the watermark must not move.
        kept = watermarks.advance_watermark(
            s, conn.id, 5, "history", "m0", datetime(2024, 1, 1, 13, tzinfo=plus_two)
        )
    assert kept.last_id == "m1"


def test_unreachable_postgresql_is_storage_unavailable() -> None:
    database = Database("postgresql+psycopg://nobody:hunter2@127.0.0.1:1/none?connect_timeout=2")
    try:
        with (
            pytest.raises(StorageUnavailable, match="database unavailable") as caught,
            database.session() as s,
        ):
            s.execute(text("SELECT 1"))
        assert "hunter2" not in str(caught.value)
    finally:
        database.dispose()


def test_unopenable_sqlite_is_storage_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    database = Database(f"sqlite:///{blocker / 'x.db'}")
    try:
        with pytest.raises(StorageUnavailable), database.session() as s:
            s.execute(text("SELECT 1"))
    finally:
        database.dispose()


def test_missing_schema_needs_attention(empty_db: Database) -> None:
    with pytest.raises(NeedsAttention, match="run the migrations"), empty_db.session() as s:
        connections.list_connections(s)


def test_unique_violation_without_a_caller_message_names_the_rule(
    db: Database, conn: Connection
) -> None:
    rule = "a connection with this name already exists"
    with pytest.raises(ValidationError, match=rule), db.session() as s:
        s.add(Connection(name="main", base_url="https://x", token_encrypted="x"))


def test_foreign_key_violation_is_a_validation_error(db: Database) -> None:
    with pytest.raises(ValidationError, match="referenced row"), db.session() as s:
        s.add(
            Watermark(
                connection_id=999,
                room_id=1,
                stream="history",
                last_id="x",
                last_date=datetime.now(UTC),
            )
        )
