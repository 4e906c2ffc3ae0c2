"""The tests' own PostgreSQL cluster (tests/pg_server.py): started, stopped, started again."""

from __future__ import annotations

import psycopg
import pytest

from tests.pg_server import PostgresServer
from tests.test_redis_server import refuses

pytestmark = pytest.mark.integration  # real PostgreSQL server processes


def test_a_cluster_of_its_own_stops_and_comes_back_with_its_data() -> None:
    with PostgresServer() as pg:
        assert pg.port is not None
        url = pg.create_database("mine")
        assert url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/mine"
        with psycopg.connect(pg.admin_url("mine"), autocommit=True) as db:
            db.execute("CREATE TABLE kept (n int)")
            db.execute("INSERT INTO kept VALUES (1)")
        pg.stop()
        assert refuses(pg.port)
        pg.start()  # same port, same data
        with psycopg.connect(pg.admin_url("mine")) as db:
            assert db.execute("SELECT n FROM kept").fetchall() == [(1,)]
    assert not pg.directory.exists()
    assert refuses(pg.port)
