"""The tests' own ``redis-server`` (tests/redis_server.py): started, restarted, stopped."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration  # a real redis-server process


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_server_of_its_own_on_a_free_loopback_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        assert server.port is not None
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = server.client()
        assert client.set("k", "v")
        assert client.dbsize() == 1  # nobody else's keys
        info = client.config_get("save") | client.config_get("appendonly")
        assert info == {"save": "", "appendonly": "no"}
        client.close()
    assert not server.running()
    assert refuses(server.port)
    server.stop()  # stopping twice is harmless


def test_restart_keeps_the_port_and_comes_back_empty(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
        client = server.client()
        client.set("k", "v")
        server.restart()
        assert server.port == port
        assert client.get("k") is None  # the old client reconnects to the new server
        assert client.dbsize() == 0
        client.close()


def test_an_append_only_server_keeps_its_data_unless_emptied(tmp_path: Path) -> None:
    with RedisServer(tmp_path, appendonly=True) as server:
        client = server.client()
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        server.restart(empty=False)
        assert client.get("k") == b"v"
        server.restart(empty=True)
        assert client.get("k") is None
        client.close()


def test_a_stopped_server_refuses_and_starts_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        client = server.client()
        server.stop()
        assert server.port is not None
        assert refuses(server.port)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.ping()
        client.close()
    finally:
        server.stop()
