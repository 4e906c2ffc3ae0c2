"""What a connection posted to HipChat: posts in flight (intents) and posts made (its own).

Two promises rest on this memory:

* **Once in effect across crashes.** Before a post or a notification, its operation (an action
  task's id, a delivery's idempotency key) records an *intent* with the time it began. A
  redelivered operation that finds an earlier intent may already have reached HipChat (a
  worker killed after the POST, before its acknowledgement): it looks in the room's recent
  history for its own earlier post before posting again (:mod:`tasks.actions`).
* **No reply loops.** Every message id the connection posts, and a fingerprint of every
  notification it sends, is remembered for :data:`OWN_POSTS_SECONDS`; a poll does not fire a
  subscription on them unless the subscription asks for them (``include_own``).

Redis holds it for workers (keys under the connection's hash tag); in embedded mode a SQLite
file in the data directory does, shared by every process (:class:`SqlitePosts`).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable
from typing import Protocol

from tasks.keys import Keys
from tasks.redis_conn import RedisClient, redis_errors
from tasks.shared_file import SharedFile

# How long a post is remembered as the connection's own: far longer than a poll interval.
OWN_POSTS_SECONDS = 24 * 3600.0
# How long an intent is kept: longer than any redelivery (the broker's visibility timeout).
INTENT_SECONDS = 24 * 3600.0
# At most this many own posts are remembered per connection (the oldest go first).
OWN_POSTS_MAX = 10_000


def message_key(message_id: str) -> str:
    return f"m:{message_id}"


def notification_key(text: str, from_label: str | None) -> str:
    """A notification has no id HipChat returns: its sender label and text identify it."""
    digest = hashlib.sha256(f"{from_label or ''}\0{text}".encode()).hexdigest()[:32]
    return f"n:{digest}"


def _operation(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class Posts(Protocol):
    def begin(self, connection_id: int, operation: str) -> float | None:
        """Record that ``operation`` is about to post; the start time (epoch seconds) of an
        earlier attempt of the same operation, or None if this is the first."""

    def withdraw(self, connection_id: int, operation: str) -> None:
        """Forget ``operation``'s intent: the attempt that recorded it never called HipChat."""

    def remember(self, connection_id: int, keys: Iterable[str]) -> None:
        """These posts (:func:`message_key`, :func:`notification_key`) are the connection's."""

    def own(self, connection_id: int, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` the connection posted (within :data:`OWN_POSTS_SECONDS`)."""


class RedisPosts:
    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def begin(self, connection_id: int, operation: str) -> float | None:
        key = self._keys.post_intent(connection_id, _operation(operation))
        now = time.time()
        with redis_errors("post intent", f"connection {connection_id}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(key, repr(now), nx=True, px=int(INTENT_SECONDS * 1000))
            pipe.get(key)
            created, stored = pipe.execute()
        return None if created else float(stored)

    def withdraw(self, connection_id: int, operation: str) -> None:
        key = self._keys.post_intent(connection_id, _operation(operation))
        with redis_errors("post intent", f"connection {connection_id}"):
            self._redis.delete(key)

    def remember(self, connection_id: int, keys: Iterable[str]) -> None:
        members = {k: time.time() for k in keys}
        if not members:
            return
        key = self._keys.own_posts(connection_id)
        with redis_errors("own posts", f"connection {connection_id}"):
            pipe = self._redis.pipeline(transaction=False)
            pipe.zadd(key, members)
            pipe.zremrangebyscore(key, "-inf", time.time() - OWN_POSTS_SECONDS)
            pipe.zremrangebyrank(key, 0, -OWN_POSTS_MAX - 1)
            pipe.pexpire(key, int(OWN_POSTS_SECONDS * 1000))
            pipe.execute()

    def own(self, connection_id: int, keys: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        with redis_errors("own posts", f"connection {connection_id}"):
            scores = self._redis.zmscore(self._keys.own_posts(connection_id), wanted)
        since = time.time() - OWN_POSTS_SECONDS
        return {k for k, score in zip(wanted, scores, strict=True) if score and score >= since}


class SqlitePosts:
    """The same memory in the embedded mode's shared file."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS post_intents (
        connection_id INTEGER NOT NULL,
        operation TEXT NOT NULL,
        began REAL NOT NULL,
        PRIMARY KEY (connection_id, operation)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS own_posts (
        connection_id INTEGER NOT NULL,
        post TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (connection_id, post)
    ) WITHOUT ROWID;
    """

    def __init__(self, shared: SharedFile) -> None:
        self._shared = shared
        shared.add_schema(self.SCHEMA)

    def begin(self, connection_id: int, operation: str) -> float | None:
        now = time.time()
        with self._shared.transaction() as db:
            db.execute("DELETE FROM post_intents WHERE began < ?", (now - INTENT_SECONDS,))
            row = db.execute(
                "SELECT began FROM post_intents WHERE connection_id = ? AND operation = ?",
                (connection_id, _operation(operation)),
            ).fetchone()
            if row is not None:
                return float(row[0])
            db.execute(
                "INSERT INTO post_intents (connection_id, operation, began) VALUES (?, ?, ?)",
                (connection_id, _operation(operation), now),
            )
        return None

    def withdraw(self, connection_id: int, operation: str) -> None:
        with self._shared.transaction() as db:
            db.execute(
                "DELETE FROM post_intents WHERE connection_id = ? AND operation = ?",
                (connection_id, _operation(operation)),
            )

    def remember(self, connection_id: int, keys: Iterable[str]) -> None:
        now = time.time()
        rows = [(connection_id, k, now) for k in keys]
        with self._shared.transaction() as db:
            db.executemany("INSERT OR REPLACE INTO own_posts VALUES (?, ?, ?)", rows)
            db.execute("DELETE FROM own_posts WHERE at < ?", (now - OWN_POSTS_SECONDS,))

    def own(self, connection_id: int, keys: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        since = time.time() - OWN_POSTS_SECONDS
        with self._shared.transaction() as db:
            return {k for k in wanted if _posted(db, connection_id, k, since)}


def _posted(db: sqlite3.Connection, connection_id: int, key: str, since: float) -> bool:
    row = db.execute(
        "SELECT 1 FROM own_posts WHERE connection_id = ? AND post = ? AND at >= ?",
        (connection_id, key, since),
    ).fetchone()
    return row is not None
