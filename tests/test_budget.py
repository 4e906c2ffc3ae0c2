"""The shared per-connection budget, against fakeredis and real Redis (``any_redis``).

Real Redis TIME cannot be faked, so exact waits are checked against brackets: Redis TIME read
just before and just after the calls involved. The script's clock lies inside them, so an
exact ``retry_after`` must land inside the bracket computed from them (microseconds wide).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import fakeredis
import pytest
import redis
from fakeredis.commands_mixins import server_mixin
from redis.crc import key_slot

from storage.errors import BucketEmpty, RetryLater, StorageUnavailable
from tasks.budget import SlidingLogBudget, TakeResult
from tasks.keys import Keys
from tasks.redis_conn import connect, redis_errors
from tasks.settings import Settings
from tests.waiting import wait_for

CONN = 42
HOUR = 3600.0


def now_us(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1_000_000 + int(micros)


def us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def timed(r: redis.Redis, call: Callable[[], TakeResult]) -> tuple[int, TakeResult, int]:
    """(Redis TIME before, result, Redis TIME after): the script's clock lies between."""
    before = now_us(r)
    result = call()
    return before, result, now_us(r)


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


def make(r: redis.Redis, keys: Keys, capacity: int, window: float = HOUR) -> SlidingLogBudget:
    return SlidingLogBudget(r, keys, capacity=capacity, window_seconds=window)


# -- take / peek / acquire / clear ------------------------------------------------------------


def test_starts_full_and_grants_exactly_capacity(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=5)
    results = [bucket.take(CONN) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results] == [4.0, 3.0, 2.0, 1.0, 0.0, 0.0]
    assert [r.retry_after for r in results[:5]] == [0.0] * 5
    assert 0 < results[5].retry_after <= HOUR


def test_take_n_is_all_or_nothing(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=5)
    assert bucket.take(CONN, 3) == TakeResult(True, 2.0, 0.0)
    refused = bucket.take(CONN, 3)
    assert (refused.allowed, refused.remaining) == (False, 2.0)
    assert bucket.take(CONN, 2) == TakeResult(True, 0.0, 0.0)
    for bad in (0, -1, 6):
        with pytest.raises(ValueError, match="n must be within"):
            bucket.take(CONN, bad)


def test_retry_after_is_exact(any_redis: redis.Redis, keys: Keys) -> None:
    window = us(60.0)
    bucket = make(any_redis, keys, capacity=3, window=60.0)
    stamps = [timed(any_redis, lambda: bucket.take(CONN)) for _ in range(3)]
    # Taking n more needs the n-th oldest call out of the window: its stamp + W - now.
    cases: list[tuple[int, Callable[[], TakeResult]]] = [
        (1, lambda: bucket.peek(CONN)),
        (1, lambda: bucket.take(CONN)),
        (2, lambda: bucket.take(CONN, 2)),
    ]
    for n, call in cases:
        stamp_lo, _, stamp_hi = stamps[n - 1]
        lo, result, hi = timed(any_redis, call)
        assert not result.allowed
        assert stamp_lo + window - hi <= us(result.retry_after) <= stamp_hi + window - lo


class FrozenClock:
    """Stands in for the ``time`` module fakeredis's TIME command reads."""

    def __init__(self, epoch: float) -> None:
        self.now = epoch

    def time(self) -> float:
        return self.now


def test_boundaries_to_the_microsecond_on_a_frozen_clock(
    monkeypatch: pytest.MonkeyPatch, key_prefix: str
) -> None:
    """On a fake server the script's clock can be set, so every wait is checked exactly."""
    clock = FrozenClock(1_800_000_000.0)
    monkeypatch.setattr(server_mixin, "time", clock)
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    bucket = make(r, Keys(key_prefix), capacity=3, window=60.0)
    start = clock.now
    for offset in (0.0, 1.0, 2.0):
        clock.now = start + offset
        assert bucket.take(CONN).allowed
    clock.now = start + 10.0
    assert bucket.peek(CONN) == TakeResult(False, 0.0, 50.0)
    assert bucket.take(CONN, 2) == TakeResult(False, 0.0, 51.0)
    clock.now = start + 60.0 - 1e-6
    assert bucket.take(CONN) == TakeResult(False, 0.0, 1e-6)
    clock.now = start + 60.0  # the first call leaves the window exactly now
    assert bucket.take(CONN) == TakeResult(True, 0.0, 0.0)
    assert bucket.take(CONN) == TakeResult(False, 0.0, 1.0)
    bucket.observe_429(CONN, reset_at=start + 100.0)
    assert bucket.peek(CONN) == TakeResult(False, 0.0, 40.0)


def test_waits_agree_as_time_passes(any_redis: redis.Redis, keys: Keys) -> None:
    """Two answers taken at different moments name the same instant, to the microsecond."""
    bucket = make(any_redis, keys, capacity=1, window=60.0)
    assert bucket.take(CONN).allowed
    lo1, first, hi1 = timed(any_redis, lambda: bucket.peek(CONN))
    wait_for(lambda: now_us(any_redis) > hi1 + 2_000, 3.0, "2 ms of Redis TIME", step=0.005)
    lo2, second, hi2 = timed(any_redis, lambda: bucket.peek(CONN))
    assert second.retry_after < first.retry_after
    # first.retry_after + t1 == second.retry_after + t2 with t1 in [lo1, hi1], t2 in [lo2, hi2].
    drift = us(first.retry_after) - us(second.retry_after)
    assert lo2 - hi1 <= drift <= hi2 - lo1


def test_tokens_come_back_when_the_window_slides(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=2, window=0.2)
    assert bucket.take(CONN).allowed
    assert bucket.take(CONN).allowed
    _, refused, hi = timed(any_redis, lambda: bucket.take(CONN))
    assert not refused.allowed
    wait_for(
        lambda: now_us(any_redis) >= hi + us(refused.retry_after),
        3.0,
        "the retry_after to pass in Redis TIME",
        step=0.005,
    )
    assert bucket.take(CONN).allowed


def test_acquire_takes_or_raises_bucket_empty(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=2, window=60.0)
    stamp_lo = now_us(any_redis)
    bucket.acquire(CONN)
    stamp_hi = now_us(any_redis)
    bucket.acquire(CONN)
    lo = now_us(any_redis)
    with pytest.raises(BucketEmpty) as caught:
        bucket.acquire(CONN)
    hi = now_us(any_redis)
    assert isinstance(caught.value, RetryLater)
    assert stamp_lo + us(60.0) - hi <= us(caught.value.retry_after) <= stamp_hi + us(60.0) - lo
    assert f"connection {CONN}" in str(caught.value)


def test_peek_takes_nothing_and_writes_nothing(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=3)
    assert [bucket.peek(CONN) for _ in range(5)] == [TakeResult(True, 3.0, 0.0)] * 5
    assert any_redis.exists(keys.budget_log(CONN), keys.budget_ceiling(CONN)) == 0
    bucket.take(CONN, 3)
    assert not bucket.peek(CONN).allowed
    assert bucket.peek(CONN).remaining == 0.0


def test_clear_refills_and_drops_the_ceiling(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=2)
    bucket.take(CONN, 2)
    bucket.observe_429(CONN, reset_at=time.time() + HOUR)
    assert not bucket.peek(CONN).allowed
    bucket.clear(CONN)
    assert bucket.take(CONN) == TakeResult(True, 1.0, 0.0)


def test_connections_do_not_share_a_budget(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=1)
    assert bucket.take(1).allowed
    assert bucket.take(2).allowed
    assert not bucket.take(1).allowed


def test_script_keys_share_one_cluster_slot(keys: Keys) -> None:
    slots = {key_slot(k.encode()) for k in (keys.budget_log(CONN), keys.budget_ceiling(CONN))}
    assert len(slots) == 1


def test_bad_construction_is_refused(any_redis: redis.Redis, keys: Keys) -> None:
    with pytest.raises(ValueError, match="capacity"):
        SlidingLogBudget(any_redis, keys, capacity=0)
    for window in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="window_seconds"):
            SlidingLogBudget(any_redis, keys, window_seconds=window)


# -- the guarantee: at most C in ANY window, across threads ---------------------------------


def test_race_exactly_capacity_succeed(any_redis: redis.Redis, keys: Keys) -> None:
    capacity, threads = 25, 100
    bucket = make(any_redis, keys, capacity=capacity)
    start = threading.Barrier(threads)

    def hammer(_: int) -> bool:
        start.wait()
        return bucket.take(CONN).allowed

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(hammer, range(threads)))
    assert outcomes.count(True) == capacity
    assert bucket.peek(CONN).remaining == 0.0


def test_no_window_ever_holds_more_than_capacity(any_redis: redis.Redis, keys: Keys) -> None:
    """Four threads hammer for 2.5 windows; no W-long window may hold C + 1 granted calls.

    A plain refilling bucket fails this: it grants C at once and C more within the window.
    """
    capacity, window, workers = 5, 0.3, 4
    bucket = make(any_redis, keys, capacity=capacity, window=window)
    end = now_us(any_redis) + us(2.5 * window)
    granted: list[tuple[int, int]] = []
    lock = threading.Lock()

    def hammer() -> None:
        while True:
            lo, result, hi = timed(any_redis, lambda: bucket.take(CONN))
            if lo > end:
                return
            if result.allowed:
                with lock:
                    granted.append((lo, hi))

    pool = [threading.Thread(target=hammer) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()

    # Each call happened inside its bracket. C + 1 calls whose brackets all fit in less than
    # W would be a violation; find, from each start, the tightest C + 1 brackets.
    for start_lo, _ in granted:
        ends = sorted(hi for lo, hi in granted if lo >= start_lo)
        if len(ends) > capacity:
            assert ends[capacity] - start_lo >= us(window), "C + 1 calls within one window"
    # ... and the budget is used, not starved: a full window refills.
    assert 2 * capacity <= len(granted) <= 3 * capacity


# -- HipChat's ceiling ------------------------------------------------------------------------


def test_observe_caps_calls_until_reset(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=10)
    reset = (now_us(any_redis) + us(30.0)) / 1_000_000
    bucket.observe(CONN, remaining=2, reset_at=reset)
    assert bucket.peek(CONN).remaining == 2.0
    assert bucket.take(CONN) == TakeResult(True, 1.0, 0.0)
    assert bucket.take(CONN) == TakeResult(True, 0.0, 0.0)
    lo, refused, hi = timed(any_redis, lambda: bucket.take(CONN))
    assert not refused.allowed
    assert us(reset) - hi <= us(refused.retry_after) <= us(reset) - lo


def test_observe_ignores_missing_or_past_headers(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=3)
    now = now_us(any_redis) / 1_000_000
    bucket.observe(CONN, remaining=None, reset_at=now + 30)
    bucket.observe(CONN, remaining=0, reset_at=None)
    bucket.observe(CONN, remaining=0, reset_at=now - 1)
    bucket.observe(CONN, remaining=0, reset_at=float("nan"))
    assert bucket.peek(CONN) == TakeResult(True, 3.0, 0.0)
    assert any_redis.exists(keys.budget_ceiling(CONN)) == 0


def test_observe_merges_out_of_order_reports(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=100)
    now = now_us(any_redis) / 1_000_000
    reset = float(int(now) + 60)  # HipChat's reset is whole epoch seconds
    bucket.observe(CONN, remaining=10, reset_at=reset)
    bucket.observe(CONN, remaining=12, reset_at=reset)  # late answer, same window: older count
    assert bucket.peek(CONN).remaining == 10.0
    bucket.observe(CONN, remaining=7, reset_at=reset)
    assert bucket.peek(CONN).remaining == 7.0
    bucket.observe(CONN, remaining=50, reset_at=reset - 300)  # a previous window: stale
    assert bucket.peek(CONN).remaining == 7.0
    bucket.observe(CONN, remaining=50, reset_at=reset + 300)  # the next window
    assert bucket.peek(CONN).remaining == 50.0


def test_observe_429_stops_everything_until_reset(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=10)
    now = now_us(any_redis) / 1_000_000
    bucket.observe(CONN, remaining=5, reset_at=now + 300)
    bucket.observe_429(CONN, reset_at=now + 60)  # refused: our 5 were wrong
    lo, refused, hi = timed(any_redis, lambda: bucket.take(CONN))
    assert (refused.allowed, refused.remaining) == (False, 0.0)
    assert us(now + 60) - hi <= us(refused.retry_after) <= us(now + 60) - lo
    bucket.observe_429(CONN, reset_at=now + 30)  # a shorter zero does not lift the longer one
    assert bucket.peek(CONN).retry_after > 50
    bucket.observe(CONN, remaining=3, reset_at=now + 30)  # stale headers change nothing
    assert not bucket.peek(CONN).allowed
    # A refused take spent nothing: the log is still empty.
    assert any_redis.zcard(keys.budget_log(CONN)) == 0


def test_retry_after_is_the_later_of_log_and_ceiling(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=1, window=60.0)
    bucket.take(CONN)
    now = now_us(any_redis) / 1_000_000
    bucket.observe_429(CONN, reset_at=now + 10)
    assert 50 < bucket.peek(CONN).retry_after <= 60  # the log decides
    bucket.observe_429(CONN, reset_at=now + 90)
    assert 80 < bucket.peek(CONN).retry_after <= 90  # the ceiling decides


# -- nothing left behind, errors --------------------------------------------------------------


def test_keys_expire_when_idle(any_redis: redis.Redis, keys: Keys) -> None:
    bucket = make(any_redis, keys, capacity=5, window=60.0)
    bucket.take(CONN)
    assert 59_000 < any_redis.pttl(keys.budget_log(CONN)) <= 60_000
    bucket.observe(CONN, remaining=3, reset_at=now_us(any_redis) / 1_000_000 + 30)
    assert 29_000 < any_redis.pttl(keys.budget_ceiling(CONN)) <= 30_000

    short = make(any_redis, keys, capacity=5, window=0.1)
    short.take(7)
    short.observe(7, remaining=3, reset_at=now_us(any_redis) / 1_000_000 + 0.1)
    wait_for(
        lambda: any_redis.exists(keys.budget_log(7), keys.budget_ceiling(7)) == 0,
        3.0,
        "the budget keys to expire",
        step=0.005,
    )


def test_survives_a_script_cache_flush(key_prefix: str) -> None:
    # SCRIPT FLUSH empties the cache of the whole server: only on a private fake one, never on
    # the Redis other suites share.
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    bucket = make(r, Keys(key_prefix), capacity=2)
    assert bucket.take(CONN).allowed
    r.script_flush()
    assert bucket.take(CONN).allowed
    assert not bucket.take(CONN).allowed


def test_programming_errors_are_not_disguised(any_redis: redis.Redis, keys: Keys) -> None:
    any_redis.set(keys.budget_log(CONN), "not a sorted set")
    with pytest.raises(redis.ResponseError):
        make(any_redis, keys, capacity=2).take(CONN)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("credentials", [":s3cret-pw@", "hipchat:s3cret-pw@"])
def test_unreachable_redis_is_storage_unavailable(key_prefix: str, credentials: str) -> None:
    url = f"redis://{credentials}127.0.0.1:{closed_port()}/0"
    bucket = make(connect(Settings(redis_url=url)), Keys(key_prefix), capacity=2)
    calls: list[Callable[[], object]] = [
        lambda: bucket.take(CONN),
        lambda: bucket.acquire(CONN),
        lambda: bucket.peek(CONN),
        lambda: bucket.observe(CONN, remaining=1, reset_at=time.time() + 60),
        lambda: bucket.observe_429(CONN, reset_at=time.time() + 60),
        lambda: bucket.clear(CONN),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert "s3cret-pw" not in str(caught.value)
        assert f"connection {CONN}" in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        assert caught.value.retry_after > 0


def test_translated_messages_never_carry_a_password() -> None:
    leaky = redis.ConnectionError(
        "Error connecting to redis://hipchat:s3cret-pw@10.0.0.5:6379/0 (password=s3cret-pw)"
    )
    with pytest.raises(StorageUnavailable) as caught, redis_errors("bucket take", CONN):
        raise leaky
    assert "s3cret-pw" not in str(caught.value)
    assert "10.0.0.5:6379" in str(caught.value)  # where it failed is still said
    assert caught.value.__cause__ is leaky
