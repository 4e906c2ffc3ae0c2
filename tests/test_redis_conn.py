"""The Redis client factory: real clients from a URL, one shared fake server when embedded."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import fakeredis
import redis

from tasks.redis_conn import (
    HEALTH_CHECK_INTERVAL_SECONDS,
    SOCKET_CONNECT_TIMEOUT_SECONDS,
    SOCKET_TIMEOUT_SECONDS,
    connect,
    embedded_server,
)
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_clients_share_one_server(key_prefix: str) -> None:
    first, second = connect(Settings()), connect(Settings())
    assert isinstance(first, fakeredis.FakeRedis)
    assert first.connection_pool.connection_kwargs["server"] is embedded_server()
    assert embedded_server() is embedded_server()
    key = f"{key_prefix}:shared"
    try:
        first.set(key, "x")
        assert second.get(key) == b"x"  # bytes: decode_responses=False
    finally:
        first.delete(key)


def test_embedded_runtimes_on_one_data_dir_share_one_budget(tmp_path: Path) -> None:
    """`run`, the action commands and the Python API are separate processes in embedded
    mode: they share the budget through the data directory (test_budget.py races 8 of them)."""
    one = Runtime(Settings(data_dir=str(tmp_path), bucket_capacity=2))
    other = Runtime(Settings(data_dir=str(tmp_path), bucket_capacity=2))
    one.budget.initialise(1)
    assert one.budget.take(1).granted
    assert other.budget.take(1).granted
    assert not one.budget.take(1).granted


def test_real_client_from_url(real_redis: redis.Redis, key_prefix: str) -> None:
    client = connect(Settings(redis_url=REDIS_URL))
    assert type(client) is redis.Redis
    options = client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    assert options["socket_connect_timeout"] == SOCKET_CONNECT_TIMEOUT_SECONDS
    assert options["health_check_interval"] == HEALTH_CHECK_INTERVAL_SECONDS
    assert options.get("decode_responses", False) is False
    client.set(f"{key_prefix}:real", "x")  # real_redis removes it afterwards
    assert client.get(f"{key_prefix}:real") == b"x"
    client.close()


def test_a_forked_child_gets_its_own_embedded_server() -> None:
    # In a fresh interpreter: forking this multi-threaded test process is not safe.
    script = textwrap.dedent(
        """
        import os
        from tasks.redis_conn import embedded_server
        parent = embedded_server()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if embedded_server() is not parent else 1)
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=20, check=False)
    assert done.returncode == 0
