"""What a connection posted: intents and own posts, on Redis (fake and real) and on the
embedded mode's shared file."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
import redis

from tasks.keys import Keys
from tasks.posts import (
    Posts,
    RedisPosts,
    SqlitePosts,
    message_key,
    notification_key,
)
from tasks.shared_file import SharedFile

CONN = 7


@pytest.fixture(params=["fakeredis", "redis", "sqlite"])
def posts(request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path) -> Iterator[Posts]:
    if request.param == "sqlite":
        yield SqlitePosts(SharedFile(tmp_path))
        return
    if request.param == "fakeredis":
        client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        client = request.getfixturevalue("real_redis")
    yield RedisPosts(client, Keys(key_prefix))


def test_the_first_attempt_has_no_earlier_intent(posts: Posts) -> None:
    assert posts.begin(CONN, "task:abc") is None
    earlier = posts.begin(CONN, "task:abc")  # the redelivery
    assert earlier is not None
    assert posts.begin(CONN, "task:abc") == earlier  # always the first attempt's start
    assert posts.begin(CONN + 1, "task:abc") is None  # per connection
    assert posts.begin(CONN, "event:sub:1:x") is None


def test_a_withdrawn_intent_leaves_the_next_attempt_a_first_one(posts: Posts) -> None:
    assert posts.begin(CONN, "task:waited") is None
    assert posts.begin(CONN + 1, "task:waited") is None
    posts.withdraw(CONN, "task:waited")  # that attempt never called HipChat
    assert posts.begin(CONN, "task:waited") is None
    assert posts.begin(CONN + 1, "task:waited") is not None  # per connection
    posts.withdraw(CONN, "task:never-began")  # nothing to forget: harmless


def test_own_posts_are_remembered_per_connection(posts: Posts) -> None:
    mine = [message_key("m-1"), notification_key("pong hello", "bot")]
    posts.remember(CONN, mine)
    candidates = [*mine, message_key("m-2"), notification_key("pong hello", None)]
    assert posts.own(CONN, candidates) == set(mine)
    assert posts.own(CONN + 1, candidates) == set()
    assert posts.own(CONN, []) == set()


def test_a_notification_is_known_by_its_label_and_text() -> None:
    assert notification_key("hi", "bot") == notification_key("hi", "bot")
    assert notification_key("hi", "bot") != notification_key("hi", None)
    assert notification_key("hi", "bot") != notification_key("hi!", "bot")
    assert notification_key("a\0b", None) != notification_key("b", "a")  # no ambiguity
    assert message_key("x") != notification_key("x", None)


def _begin_in_a_process(data_dir: str, operation: str) -> float | None:
    return SqlitePosts(SharedFile(data_dir)).begin(CONN, operation)


def test_the_embedded_file_is_shared_between_processes(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        first = pool.apply(_begin_in_a_process, (str(tmp_path), "task:shared"))
        second = pool.apply(_begin_in_a_process, (str(tmp_path), "task:shared"))
    assert first is None
    assert second is not None
