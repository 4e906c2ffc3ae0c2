"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu wraps its connection pool in a new ``redis.Redis`` for every command it sends
(``Channel.conn_or_acquire``), and redis-py 8 builds a table of about 170 response callbacks
in each client's constructor (redis/redis-py#3624). A worker made three such clients per task
(acknowledging, the task events, the unacked bookkeeping): 12 % of its CPU on quiet polls.
One client serves them all: each command checks a connection out of the pool, so a client is
safe to share between the worker's threads. A channel whose pool was replaced (after a lost
connection) gets a new client.

:func:`install` (called by ``create_app``) makes it the transport of kombu's ``redis`` and
``rediss`` schemes in this process, so that every connection of the app (the workers', beat's,
Flower's) uses it and still calls itself ``redis://``; nothing else changes (the same keys,
queues and messages).
"""

from __future__ import annotations

from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:  # the channel's own BRPOP/pub-sub clients, made once by kombu
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()  # type: ignore[no-untyped-call]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


SCHEMES = ("redis", "rediss")
PATH = f"{__name__}:Transport"


def install() -> None:
    """Make :class:`Transport` the transport of the ``redis``/``rediss`` schemes."""
    for scheme in SCHEMES:
        if kombu_transport.TRANSPORT_ALIASES.get(scheme) != PATH:
            kombu_transport.TRANSPORT_ALIASES[scheme] = PATH
            kombu_transport._transport_cache.pop(scheme, None)
