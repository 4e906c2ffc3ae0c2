"""The poll lease, the drain lock and the poll slot, against fakeredis and real Redis
(``any_redis``)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from redis.lock import Lock

from storage.errors import StorageUnavailable
from tasks.keys import Keys
from tasks.lease import Leases
from tasks.redis_conn import connect
from tasks.settings import Settings
from tests.waiting import wait_for

CONN = 7


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def lease(any_redis: redis.Redis, keys: Keys) -> Leases:
    return Leases(any_redis, keys)


@pytest.fixture
def short(any_redis: redis.Redis, keys: Keys) -> Leases:
    """Leases whose locks live 0.3 s unless renewed."""
    return Leases(any_redis, keys, ttl_seconds=0.3)


def race(threads: int, attempt: Callable[[int], bool]) -> list[bool]:
    start = threading.Barrier(threads)

    def run(i: int) -> bool:
        start.wait()
        return attempt(i)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, range(threads)))


# -- the poll lease and the drain lock ----------------------------------------------------------


def test_one_holder_at_a_time(lease: Leases) -> None:
    with lease.poll(CONN) as first:
        assert first
        with lease.poll(CONN) as second:
            assert not second  # not re-entrant either
        with lease.poll(CONN + 1) as other:
            assert other  # other connections are independent
        with lease.drain(CONN) as drain:
            assert drain  # a subscription's drain lock is another key
    with lease.poll(CONN) as again:
        assert again  # released when the block ended


def test_released_when_the_block_raises(lease: Leases, any_redis: redis.Redis, keys: Keys) -> None:
    def fail_while_holding() -> None:
        with lease.drain(CONN) as held:
            assert held
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fail_while_holding()
    assert any_redis.exists(keys.drain_lock(CONN)) == 0


def test_exactly_one_of_many_threads_wins(lease: Leases) -> None:
    release = threading.Event()

    def attempt(_: int) -> bool:
        with lease.poll(CONN) as held:
            if held:
                release.wait(5)
            return held

    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(attempt, i) for i in range(50)]
        wait_for(
            lambda: sum(f.done() for f in futures) >= 49,
            3.0,
            "49 threads to give up the lease",
            step=0.005,
        )
        release.set()
        outcomes = [f.result() for f in futures]
    assert outcomes.count(True) == 1


def test_a_dead_owners_lock_frees_within_its_ttl(
    short: Leases, any_redis: redis.Redis, keys: Keys
) -> None:
    # A worker killed mid-poll never releases: the key simply runs out.
    dead = Lock(any_redis, keys.poll_lease(CONN), timeout=0.3, thread_local=False)
    assert dead.acquire(blocking=False)
    with short.poll(CONN) as held:
        assert not held
    wait_for(
        lambda: any_redis.exists(keys.poll_lease(CONN)) == 0,
        2.0,
        "the dead owner's lock to expire",
        step=0.005,
    )
    with short.poll(CONN) as held:
        assert held


def test_a_held_lock_is_renewed_while_the_work_goes_on(
    short: Leases, any_redis: redis.Redis, keys: Keys
) -> None:
    key = keys.poll_lease(CONN)
    with short.poll(CONN) as held:
        assert held
        start = time.monotonic()

        def outlived_three_ttls() -> bool:
            assert any_redis.pttl(key) > 0, "the lock expired while held"
            return time.monotonic() - start > 1.0

        wait_for(outlived_three_ttls, 5.0, "three lock TTLs to pass", step=0.005)
    assert any_redis.exists(key) == 0


def test_a_late_owner_cannot_free_the_next_owners_lock(
    short: Leases, any_redis: redis.Redis, keys: Keys
) -> None:
    key = keys.drain_lock(CONN)
    with short.drain(CONN) as held:
        assert held
        short.keeper.drop(next(iter(short.keeper._held.values()))[0])  # a frozen process
        wait_for(lambda: any_redis.exists(key) == 0, 2.0, "the frozen lock to expire", step=0.005)
        nxt = Lock(any_redis, key, timeout=30, thread_local=False)
        assert nxt.acquire(blocking=False)
    # The late release logged a warning and left the next owner's lock alone.
    assert any_redis.exists(key) == 1
    nxt.release()


def test_bad_ttl_is_refused(any_redis: redis.Redis, keys: Keys, lease: Leases) -> None:
    for ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ttl_seconds"):
            Leases(any_redis, keys, ttl_seconds=ttl)
        with pytest.raises(ValueError, match="ttl_seconds"):
            lease.claim_interval(CONN, 1, ttl)


# -- the poll slot -----------------------------------------------------------------------------


def test_claim_interval_once_per_interval(
    lease: Leases, any_redis: redis.Redis, keys: Keys
) -> None:
    assert lease.claim_interval(CONN, 100, 60)
    assert not lease.claim_interval(CONN, 100, 60)  # same interval: never twice
    assert not lease.claim_interval(CONN, 99, 60)  # a late beat for an older interval
    assert lease.claim_interval(CONN, 101, 60)  # next interval: at once, old claim unexpired
    assert any_redis.get(keys.poll_slot(CONN)) == b"101"
    assert 59_000 < any_redis.pttl(keys.poll_slot(CONN)) <= 60_000
    assert lease.claim_interval(CONN + 1, 100, 60)  # other connections are independent


def test_claim_interval_is_exclusive_under_threads(lease: Leases) -> None:
    outcomes = race(50, lambda i: lease.claim_interval(CONN, 5, 60))
    assert outcomes.count(True) == 1


def test_racing_intervals_never_go_backwards(
    lease: Leases, any_redis: redis.Redis, keys: Keys
) -> None:
    outcomes = race(40, lambda i: lease.claim_interval(CONN, i % 10, 60))
    assert 1 <= outcomes.count(True) <= 10
    assert any_redis.get(keys.poll_slot(CONN)) == b"9"


def test_claim_expires(lease: Leases, any_redis: redis.Redis, keys: Keys) -> None:
    assert lease.claim_interval(CONN, 3, 0.05)
    wait_for(
        lambda: any_redis.exists(keys.poll_slot(CONN)) == 0,
        3.0,
        "the poll slot to expire",
        step=0.005,
    )
    assert lease.claim_interval(CONN, 3, 60)


def test_interval_index_must_be_an_int(lease: Leases) -> None:
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
    lease = Leases(connect(Settings(redis_url=url)), Keys(key_prefix))

    def hold() -> bool:
        with lease.poll(CONN) as held:
            return held

    calls: list[Callable[[], bool]] = [hold, lambda: lease.claim_interval(CONN, 1, 30)]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert "s3cret-pw" not in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
