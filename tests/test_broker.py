"""The Redis broker's transport (worker/broker.py): kombu's, with one client per channel."""

from __future__ import annotations

from pathlib import Path

import redis
from cryptography.fernet import Fernet

from tasks.settings import Settings
from tests.redis_server import RedisServer
from worker.app import create_app
from worker.broker import Transport


def test_a_redis_broker_uses_one_client_per_channel_and_still_carries_messages(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        redis_url=redis_server.url,
        data_dir=str(tmp_path),
        secret_key=Fernet.generate_key().decode(),
    )
    app = create_app(settings)
    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, Transport)
        channel = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first  # not one per command (redis-py#3624)
        assert isinstance(first, redis.Redis)
        channel._pool = None  # a lost connection replaces the pool: a new client goes with it
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool
        # Messages still go through: published, received, acknowledged.
        queue = connection.SimpleQueue("hipchat.test")
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


def test_the_broker_still_calls_itself_redis_for_flower(tmp_path: Path) -> None:
    """Flower picks its broker client by the URL's scheme (its queue lengths)."""
    key = Fernet.generate_key().decode()
    settings = Settings(redis_url="redis://127.0.0.1:1/0", data_dir=str(tmp_path), secret_key=key)
    with create_app(settings).connection() as connection:
        assert connection.as_uri().startswith("redis://")
        assert connection.transport.driver_type == "redis"
        assert isinstance(connection.transport, Transport)
