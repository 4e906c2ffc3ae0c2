"""The per-connection poll lease and poll slot.

* The **lease** (``Keys.poll_lease``) says who runs the poll of a connection right now: a
  string holding the owner's id, set with SET NX PX so that it frees itself if the owner dies.
  Release and extend check the owner inside Lua, so a poll that outlived its lease cannot free
  or prolong the lease a newer poll now holds.
* The **slot** (``Keys.poll_slot``) says which poll interval was last claimed, so that a
  connection is never polled twice in one interval, whatever number of beats or redeliveries.

Redis errors are translated by :func:`tasks.redis_conn.redis_errors`, the one place for them.
"""

from __future__ import annotations

import math

import redis

from tasks.keys import Keys
from tasks.redis_conn import load_script, redis_errors


def _ttl_ms(ttl_seconds: float) -> int:
    if not ttl_seconds > 0 or math.isinf(ttl_seconds):
        raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds}")
    return max(1, math.ceil(ttl_seconds * 1000))


class PollLease:
    def __init__(self, redis: redis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._release_script = redis.register_script(load_script("lease_release.lua"))
        self._extend_script = redis.register_script(load_script("lease_extend.lua"))
        self._claim_script = redis.register_script(load_script("poll_slot_claim.lua"))

    def acquire(self, connection_id: int, owner: str, ttl_seconds: float) -> bool:
        """Take the lease for ``ttl_seconds`` if nobody holds it."""
        ttl = _ttl_ms(ttl_seconds)
        with redis_errors("lease acquire", connection_id):
            done = self._redis.set(self._keys.poll_lease(connection_id), owner, nx=True, px=ttl)
        return bool(done)

    def release(self, connection_id: int, owner: str) -> bool:
        """Free the lease if ``owner`` still holds it; False if it expired or changed hands."""
        with redis_errors("lease release", connection_id):
            done = self._release_script(keys=[self._keys.poll_lease(connection_id)], args=[owner])
        return int(done) == 1

    def extend(self, connection_id: int, owner: str, ttl_seconds: float) -> bool:
        """Make the lease expire ``ttl_seconds`` from now if ``owner`` still holds it."""
        ttl = _ttl_ms(ttl_seconds)
        with redis_errors("lease extend", connection_id):
            done = self._extend_script(
                keys=[self._keys.poll_lease(connection_id)], args=[owner, ttl]
            )
        return int(done) == 1

    def claim_interval(self, connection_id: int, interval_index: int, ttl_seconds: float) -> bool:
        """Claim poll interval ``interval_index``: True once per interval, and never for an
        interval at or before one already claimed. A later interval succeeds at once, even
        while the previous claim has not expired."""
        if isinstance(interval_index, bool) or not isinstance(interval_index, int):
            raise TypeError(f"interval_index must be an int, got {interval_index!r}")
        ttl = _ttl_ms(ttl_seconds)
        with redis_errors("poll slot claim", connection_id):
            done = self._claim_script(
                keys=[self._keys.poll_slot(connection_id)], args=[interval_index, ttl]
            )
        return int(done) == 1

    def lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        """The same owner-checked lease on any key (e.g. ``Keys.drain_lock``)."""
        ttl = _ttl_ms(ttl_seconds)
        with redis_errors("lock", 0):
            return bool(self._redis.set(key, owner, nx=True, px=ttl))

    def unlock(self, key: str, owner: str) -> bool:
        with redis_errors("unlock", 0):
            return int(self._release_script(keys=[key], args=[owner])) == 1
