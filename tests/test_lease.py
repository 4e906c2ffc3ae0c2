"""The poll lease and poll slot, against fakeredis and real Redis (``any_redis``)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from storage.errors import StorageUnavailable
from tasks.keys import Keys
from tasks.lease import PollLease
from tasks.redis_conn import connect
from tasks.settings import Settings
from tests.waiting import wait_for

CONN = 7


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def lease(any_redis: redis.Redis, keys: Keys) -> PollLease:
    return PollLease(any_redis, keys)


def race(threads: int, attempt: Callable[[int], bool]) -> list[bool]:
    start = threading.Barrier(threads)

    def run(i: int) -> bool:
        start.wait()
        return attempt(i)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


# -- the lease ---------------------------------------------------------------------------------


def test_one_holder_at_a_time(lease: PollLease) -> None:
    assert lease.acquire(CONN, "a", 30)
    assert not lease.acquire(CONN, "b", 30)
    assert not lease.acquire(CONN, "a", 30)  # not re-entrant either
    assert lease.acquire(CONN + 1, "b", 30)  # other connections are independent
    assert lease.release(CONN, "a")
    assert lease.acquire(CONN, "b", 30)


def test_exactly_one_of_many_threads_wins(lease: PollLease) -> None:
    outcomes = race(50, lambda i: lease.acquire(CONN, f"worker-{i}", 30))
    assert outcomes.count(True) == 1


def test_release_checks_the_owner(lease: PollLease, any_redis: redis.Redis, keys: Keys) -> None:
    assert lease.acquire(CONN, "a", 30)
    assert not lease.release(CONN, "b")
    assert any_redis.get(keys.poll_lease(CONN)) == b"a"
    assert lease.release(CONN, "a")
    assert not lease.release(CONN, "a")  # already free
    assert any_redis.exists(keys.poll_lease(CONN)) == 0


def test_extend_checks_the_owner(lease: PollLease, any_redis: redis.Redis, keys: Keys) -> None:
    assert lease.acquire(CONN, "a", 1)
    assert not lease.extend(CONN, "b", 60)
    assert 0 < any_redis.pttl(keys.poll_lease(CONN)) <= 1_000
    assert lease.extend(CONN, "a", 60)
    assert 59_000 < any_redis.pttl(keys.poll_lease(CONN)) <= 60_000
    assert not lease.extend(CONN + 1, "a", 60)  # nothing held there


def test_lease_expires_and_a_late_owner_cannot_touch_the_next_one(lease: PollLease) -> None:
    assert lease.acquire(CONN, "slow", 0.05)
    wait_for(lambda: lease.acquire(CONN, "next", 30), 3.0, "the lease to expire", step=0.005)
    assert not lease.release(CONN, "slow")
    assert not lease.extend(CONN, "slow", 30)
    assert lease.release(CONN, "next")


def test_bad_ttl_is_refused(lease: PollLease) -> None:
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl_seconds"):
            lease.acquire(CONN, "a", ttl)
        with pytest.raises(ValueError, match="ttl_seconds"):
            lease.extend(CONN, "a", ttl)
        with pytest.raises(ValueError, match="ttl_seconds"):
            lease.claim_interval(CONN, 1, ttl)


# -- the poll slot -----------------------------------------------------------------------------


def test_claim_interval_once_per_interval(
    lease: PollLease, any_redis: redis.Redis, keys: Keys
) -> None:
    assert lease.claim_interval(CONN, 100, 60)
    assert not lease.claim_interval(CONN, 100, 60)  # same interval: never twice
    assert not lease.claim_interval(CONN, 99, 60)  # a late beat for an older interval
    assert lease.claim_interval(CONN, 101, 60)  # next interval: at once, old claim unexpired
    assert any_redis.get(keys.poll_slot(CONN)) == b"101"
    assert 59_000 < any_redis.pttl(keys.poll_slot(CONN)) <= 60_000
    assert lease.claim_interval(CONN + 1, 100, 60)  # other connections are independent


def test_claim_interval_is_exclusive_under_threads(lease: PollLease) -> None:
    outcomes = race(50, lambda i: lease.claim_interval(CONN, 5, 60))
    assert outcomes.count(True) == 1


def test_racing_intervals_never_go_backwards(
    lease: PollLease, any_redis: redis.Redis, keys: Keys
) -> None:
    outcomes = race(40, lambda i: lease.claim_interval(CONN, i % 10, 60))
    assert 1 <= outcomes.count(True) <= 10
    assert any_redis.get(keys.poll_slot(CONN)) == b"9"


def test_claim_expires(lease: PollLease, any_redis: redis.Redis, keys: Keys) -> None:
    assert lease.claim_interval(CONN, 3, 0.05)
    wait_for(
        lambda: any_redis.exists(keys.poll_slot(CONN)) == 0,
        3.0,
        "the poll slot to expire",
        step=0.005,
    )
    assert lease.claim_interval(CONN, 3, 60)


def test_interval_index_must_be_an_int(lease: PollLease) -> None:
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError):
            lease.claim_interval(CONN, bad, 60)  # type: ignore[arg-type]


# -- errors ------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_redis_is_storage_unavailable(key_prefix: str) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{closed_port()}/0"
    lease = PollLease(connect(Settings(redis_url=url)), Keys(key_prefix))
    calls: list[Callable[[], bool]] = [
        lambda: lease.acquire(CONN, "a", 30),
        lambda: lease.release(CONN, "a"),
        lambda: lease.extend(CONN, "a", 30),
        lambda: lease.claim_interval(CONN, 1, 30),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert "s3cret-pw" not in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
