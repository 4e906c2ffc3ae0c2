"""Who may work on a connection or a subscription right now, and which poll interval was done.

* The **poll lease** (``Keys.poll_lease``): one poll of a connection at a time.
* The **drain lock** (``Keys.drain_lock``): one worker at a time delivers a subscription's
  events, so they go out in order.
* The **poll slot** (``Keys.poll_slot``): the last poll interval claimed for a connection, so
  that a connection is never polled twice in one interval, whatever the number of beats or
  redeliveries.

The lease and the lock are redis-py's :class:`redis.lock.Lock` (SET NX PX with an owner token;
release and extend check the owner in Lua). Their time to live is short
(:data:`LOCK_TTL_SECONDS`), so the lock of a worker that died frees within seconds, and a
:class:`LockKeeper` thread renews every lock this process holds while its work goes on,
however long one HipChat call or one webhook takes.

Redis errors are translated by :func:`tasks.redis_conn.redis_errors`, the one place for them.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from tasks.keys import Keys
from tasks.redis_conn import RedisClient, load_script, redis_errors

log = logging.getLogger(__name__)

# A dead owner's lock frees after this long; a live owner's is renewed every third of it.
LOCK_TTL_SECONDS = 10.0
# A drain request outlives any drain that could take it; the relay covers the rest.
DRAIN_REQUEST_SECONDS = 3600


def _ttl_ms(ttl_seconds: float) -> int:
    if not ttl_seconds > 0 or math.isinf(ttl_seconds):
        raise ValueError(f"ttl_seconds must be a positive number, got {ttl_seconds}")
    return max(1, math.ceil(ttl_seconds * 1000))


class LockKeeper:
    """Renews the locks this process holds, every ``ttl / 3`` seconds, from one daemon thread.

    A lock whose renewal fails because another owner holds it now (it expired meanwhile:
    the process was frozen longer than the TTL) is dropped and logged; its holder's work is
    idempotent, so the worst case is the overlap the lock usually prevents.
    """

    def __init__(self, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._held: dict[int, tuple[Lock, str]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, lock: Lock, what: str) -> None:
        with self._lock:
            self._held[id(lock)] = (lock, what)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="hipchat-lock-keeper", daemon=True
                )
                self._thread.start()

    def drop(self, lock: Lock) -> None:
        with self._lock:
            self._held.pop(id(lock), None)

    def held(self) -> list[str]:
        with self._lock:
            return [what for _, what in self._held.values()]

    def _run(self) -> None:
        while not self._wake.wait(self.ttl_seconds / 3):
            with self._lock:
                held = list(self._held.items())
            for key, (lock, what) in held:
                self._renew(key, lock, what)

    def _renew(self, key: int, lock: Lock, what: str) -> None:
        try:
            lock.extend(self.ttl_seconds, replace_ttl=True)
        except LockError:
            log.warning("lock of %s expired while held; another worker may hold it now", what)
            with self._lock:
                self._held.pop(key, None)
        except redis.RedisError as exc:  # Redis away: try again at the next renewal
            log.warning("could not renew the lock of %s: %s", what, type(exc).__name__)


class Leases:
    """The poll leases, drain locks and poll slots of one Redis."""

    def __init__(
        self, redis: RedisClient, keys: Keys, *, ttl_seconds: float = LOCK_TTL_SECONDS
    ) -> None:
        _ttl_ms(ttl_seconds)
        self._redis = redis
        self._keys = keys
        self.keeper = LockKeeper(ttl_seconds)
        self._claim_script = redis.register_script(load_script("poll_slot_claim.lua"))

    @contextmanager
    def poll(self, connection_id: int) -> Iterator[bool]:
        """Hold the connection's poll lease for the block: True if this caller got it."""
        with self._holding(
            self._keys.poll_lease(connection_id), f"connection {connection_id}"
        ) as got:
            yield got

    @contextmanager
    def drain(self, subscription_id: int) -> Iterator[bool]:
        """Hold the subscription's drain lock for the block: True if this caller got it."""
        key = self._keys.drain_lock(subscription_id)
        with self._holding(key, f"subscription {subscription_id}") as got:
            yield got

    def draining(self, subscription_ids: list[int]) -> set[int]:
        """Which of these subscriptions a drain holds right now (one pipelined round trip)."""
        if not subscription_ids:
            return set()
        with redis_errors("drain locks", f"{len(subscription_ids)} subscription(s)"):
            pipe = self._redis.pipeline(transaction=False)
            for subscription_id in subscription_ids:
                pipe.exists(self._keys.drain_lock(subscription_id))
            held = pipe.execute()
        return {s for s, exists in zip(subscription_ids, held, strict=True) if exists}

    def request_drain(self, subscription_id: int) -> None:
        """Ask whoever holds the subscription's drain lock to drain once more after it."""
        with redis_errors("drain request", f"subscription {subscription_id}"):
            self._redis.set(
                self._keys.drain_request(subscription_id), b"1", ex=DRAIN_REQUEST_SECONDS
            )

    def take_drain_request(self, subscription_id: int) -> bool:
        """True (once) if a drain was requested while the lock was held."""
        with redis_errors("drain request", f"subscription {subscription_id}"):
            return self._redis.getdel(self._keys.drain_request(subscription_id)) is not None

    def claim_interval(self, connection_id: int, interval_index: int, ttl_seconds: float) -> bool:
        """Claim poll interval ``interval_index``: True once per interval, and never for an
        interval at or before one already claimed. A later interval succeeds at once, even
        while the previous claim has not expired."""
        if isinstance(interval_index, bool) or not isinstance(interval_index, int):
            raise TypeError(f"interval_index must be an int, got {interval_index!r}")
        ttl = _ttl_ms(ttl_seconds)
        with redis_errors("poll slot claim", f"connection {connection_id}"):
            done = self._claim_script(
                keys=[self._keys.poll_slot(connection_id)], args=[interval_index, ttl]
            )
        return int(done) == 1

    @contextmanager
    def _holding(self, key: str, what: str) -> Iterator[bool]:
        lock = Lock(
            self._redis,
            key,
            timeout=self.keeper.ttl_seconds,
            blocking=False,
            thread_local=False,  # the keeper thread renews it with the same token
        )
        with redis_errors("lock", what):
            got = bool(lock.acquire(blocking=False))
        if not got:
            yield False
            return
        self.keeper.hold(lock, what)
        try:
            yield True
        finally:
            self.keeper.drop(lock)
            try:
                with redis_errors("unlock", what):
                    lock.release()
            except LockError:
                log.warning("lock of %s had expired before its release", what)
