"""The shared per-connection budget: one table of behaviour against every backend.

``budget`` runs each test on fakeredis (the Lua script), real Redis (the same script) and the
embedded SQLite file (the same rules in Python). Real Redis TIME cannot be frozen, so there the
exact waits are checked against brackets: the backend's clock read just before and just after
the calls involved. On fakeredis and SQLite the clock is frozen (``frozen``) and every wait is
checked to the microsecond.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fakeredis
import pytest
import redis
from fakeredis.commands_mixins import server_mixin
from redis.crc import key_slot

from storage.errors import BucketEmpty, RetryLater, StorageUnavailable
from tasks import budget_sqlite
from tasks.budget import BudgetEmpty, Gate, Grant, LogBackend, RedisLog, SlidingLogBudget, Status
from tasks.budget_sqlite import SqliteLog
from tasks.hipchat_types import RateLimitInfo
from tasks.keys import Keys
from tasks.redis_conn import connect, redis_errors
from tasks.settings import Settings
from tasks.shared_file import SharedFile
from tests.waiting import wait_for

CONN = 42
HOUR = 3600.0
GRANTED = Grant(Status.GRANTED)


def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    wait_for(condition, timeout, "the budget's clock")


def us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@dataclass
class Backend:
    """One backend under test: its log, its clock, and (for Redis) the client."""

    name: str
    log: LogBackend
    now_us: Callable[[], int]
    client: redis.Redis | None = None

    def make(
        self, capacity: int, window: float = HOUR, margin: float = 0.0, *, fresh: bool = True
    ) -> SlidingLogBudget:
        budget = SlidingLogBudget(
            self.log, capacity=capacity, window_seconds=window, margin_seconds=margin
        )
        if fresh:
            for conn in (CONN, 1, 2, 7):
                budget.initialise(conn)
        return budget

    def timed(self, call: Callable[[], Grant]) -> tuple[int, Grant, int]:
        """(clock before, answer, clock after): the backend's clock lies between."""
        before = self.now_us()
        answer = call()
        return before, answer, self.now_us()


def redis_now_us(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1_000_000 + int(micros)


@pytest.fixture(params=["fakeredis", "redis", "sqlite"])
def budget(request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", SqliteLog(SharedFile(tmp_path)), lambda: time.time_ns() // 1000)
        return
    if request.param == "fakeredis":
        client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        client = request.getfixturevalue("real_redis")
    yield Backend(
        request.param, RedisLog(client, Keys(key_prefix)), lambda: redis_now_us(client), client
    )


class FrozenClock:
    """The clock of fakeredis's TIME and of the SQLite backend, set by the test."""

    def __init__(self, epoch: float) -> None:
        self.now = epoch

    def time(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return round(self.now * 1e6) * 1000  # whole microseconds, as the backends keep


@pytest.fixture(params=["fakeredis", "sqlite"])
def frozen(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, key_prefix: str, tmp_path: Path
) -> tuple[Backend, FrozenClock]:
    clock = FrozenClock(1_800_000_000.0)
    if request.param == "sqlite":
        monkeypatch.setattr(budget_sqlite, "time", clock)
        backend = Backend("sqlite", SqliteLog(SharedFile(tmp_path)), lambda: round(clock.now * 1e6))
    else:
        monkeypatch.setattr(server_mixin, "time", clock)
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        backend = Backend(
            "fakeredis", RedisLog(client, Keys(key_prefix)), lambda: round(clock.now * 1e6), client
        )
    return backend, clock


def refused(wait: float) -> Grant:
    return Grant(Status.REFUSED, wait)


# -- take / peek / acquire ----------------------------------------------------------------------


def test_grants_exactly_capacity_then_refuses(budget: Backend) -> None:
    b = budget.make(capacity=5)
    answers = [b.take(CONN) for _ in range(6)]
    assert answers[:5] == [GRANTED] * 5
    assert answers[5].status is Status.REFUSED
    assert 0 < answers[5].wait <= HOUR


def test_take_n_is_all_or_nothing(budget: Backend) -> None:
    b = budget.make(capacity=5)
    assert b.take(CONN, 3) == GRANTED
    assert b.take(CONN, 3).status is Status.REFUSED
    assert b.take(CONN, 2) == GRANTED
    assert b.take(CONN).status is Status.REFUSED
    for bad in (0, -1, 6):
        with pytest.raises(ValueError, match="n must be within"):
            b.take(CONN, bad)


def test_exact_waits_to_the_microsecond(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=3, window=60.0)
    start = clock.now
    for offset in (0.0, 1.0, 2.0):
        clock.now = start + offset
        assert b.take(CONN) == GRANTED
    clock.now = start + 10.0
    assert b.peek(CONN) == refused(50.0)
    assert b.take(CONN, 2) == refused(51.0)  # the second-oldest must leave the window too
    clock.now = start + 60.0 - 1e-6
    assert b.take(CONN) == refused(1e-6)
    clock.now = start + 60.0  # the first call leaves the window exactly now
    assert b.take(CONN) == GRANTED
    assert b.take(CONN) == refused(1.0)
    b.observe_429(CONN, reset_at=start + 100.0)
    assert b.peek(CONN) == refused(40.0)


def test_the_margin_widens_the_window(frozen: tuple[Backend, FrozenClock]) -> None:
    """HipChat stamps arrival: with a 2 s margin, C + 1 calls are always 62 s apart here."""
    backend, clock = frozen
    b = backend.make(capacity=2, window=60.0, margin=2.0)
    start = clock.now
    assert b.take(CONN, 2) == GRANTED
    clock.now = start + 60.0
    assert b.take(CONN) == refused(2.0)
    clock.now = start + 62.0
    assert b.take(CONN) == GRANTED


def test_exact_wait_on_a_real_clock(budget: Backend) -> None:
    window = us(60.0)
    b = budget.make(capacity=3, window=60.0)
    stamps = [budget.timed(lambda: b.take(CONN)) for _ in range(3)]
    # Taking n more needs the n-th oldest call out of the window: its stamp + W - now.
    cases: list[tuple[int, Callable[[], Grant]]] = [
        (1, lambda: b.peek(CONN)),
        (1, lambda: b.take(CONN)),
        (2, lambda: b.take(CONN, 2)),
    ]
    for n, call in cases:
        stamp_lo, _, stamp_hi = stamps[n - 1]
        lo, answer, hi = budget.timed(call)
        assert answer.status is Status.REFUSED
        assert stamp_lo + window - hi <= us(answer.wait) <= stamp_hi + window - lo


def test_calls_come_back_when_the_window_slides(budget: Backend) -> None:
    b = budget.make(capacity=2, window=0.2)
    assert b.take(CONN, 2) == GRANTED
    _, answer, hi = budget.timed(lambda: b.take(CONN))
    assert answer.status is Status.REFUSED
    wait_until(lambda: budget.now_us() >= hi + us(answer.wait))
    assert b.take(CONN) == GRANTED


def test_acquire_takes_or_raises_budget_empty(budget: Backend) -> None:
    b = budget.make(capacity=2, window=60.0)
    b.acquire(CONN)
    b.acquire(CONN)
    with pytest.raises(BudgetEmpty) as caught:
        b.acquire(CONN)
    assert isinstance(caught.value, BucketEmpty)
    assert isinstance(caught.value, RetryLater)
    assert 59.0 < caught.value.retry_after <= 60.0
    assert caught.value.reservation is None
    assert f"connection {CONN}" in str(caught.value)


def test_peek_writes_nothing(budget: Backend) -> None:
    b = budget.make(capacity=3)
    assert [b.peek(CONN) for _ in range(5)] == [GRANTED] * 5
    assert b.usage(CONN).used == 0
    assert b.take(CONN, 3) == GRANTED
    assert b.peek(CONN).status is Status.REFUSED


def test_connections_do_not_share_a_budget(budget: Backend) -> None:
    b = budget.make(capacity=1)
    assert b.take(1) == GRANTED
    assert b.take(2) == GRANTED
    assert b.take(1).status is Status.REFUSED


def test_usage_counts_the_window_and_hipchats_word(budget: Backend) -> None:
    b = budget.make(capacity=4, window=60.0)
    b.take(CONN, 3)
    b.reserve(CONN, 2)  # one fits now, so both wait for the first slot to free: reserved
    reset = budget.now_us() / 1e6 + 30
    b.observe(CONN, remaining=7, reset_at=reset)
    usage = b.usage(CONN)
    assert (usage.used, usage.reserved, usage.capacity) == (3, 2, 4)
    assert usage.hipchat_remaining == 7
    assert usage.hipchat_reset_at == pytest.approx(reset, abs=1e-6)


# -- reservations: one wait per caller, first come first served ---------------------------------


def test_reservations_queue_in_order(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=3, window=60.0)
    start = clock.now
    for offset in (0.0, 1.0, 2.0):
        clock.now = start + offset
        assert b.reserve(CONN) == GRANTED  # room now: a reservation is a plain grant
    clock.now = start + 10.0
    waits = [b.reserve(CONN) for _ in range(4)]
    assert [(w.status, w.wait) for w in waits] == [
        (Status.RESERVED, 50.0),  # when the call at start + 0 leaves the window
        (Status.RESERVED, 51.0),
        (Status.RESERVED, 52.0),
        (Status.RESERVED, 110.0),  # when the first reservation leaves it
    ]
    # A newcomer, reserving or not, queues behind every reservation.
    assert b.take(CONN).wait == pytest.approx(111.0)
    assert b.reserve(CONN, 2).wait == pytest.approx(112.0 + 1e-6)


def test_a_due_reservation_is_granted_without_taking_again(
    frozen: tuple[Backend, FrozenClock],
) -> None:
    backend, clock = frozen
    b = backend.make(capacity=1, window=60.0, margin=2.0)  # tolerance: 1 s after the stamp
    start = clock.now
    assert b.take(CONN) == GRANTED
    held = b.reserve(CONN)
    assert (held.status, held.wait) == (Status.RESERVED, 62.0)
    clock.now = start + 61.0
    early = b.reserve(CONN, held=held.reservation)  # too early: the same one, 1 s to go
    assert (early.status, early.wait, early.reservation) == (
        Status.RESERVED, 1.0, held.reservation,
    )  # fmt: skip
    assert b.usage(CONN).reserved == 1  # nothing new was reserved
    b.reserve(CONN)
    clock.now = start + 62.5
    assert b.reserve(CONN, held=held.reservation) == GRANTED  # due, within tolerance
    assert b.usage(CONN).reserved == 1  # the one made at 61 s still waits


def test_a_late_reservation_gives_its_slot_back_and_queues_again(
    frozen: tuple[Backend, FrozenClock],
) -> None:
    """A busy worker came back after the tolerance: its slot passed unused, so it stands for
    no call. It leaves the log (nothing is wasted) and the caller is served like a newcomer."""
    backend, clock = frozen
    b = backend.make(capacity=1, window=60.0, margin=2.0)
    start = clock.now
    assert b.take(CONN) == GRANTED
    held = b.reserve(CONN)  # at start + 62
    clock.now = start + 70.0  # 8 s late: the window has room now
    assert b.reserve(CONN, held=held.reservation) == GRANTED
    assert (b.usage(CONN).used, b.usage(CONN).reserved) == (1, 0)  # only the call at 70 s
    later = b.reserve(CONN)
    assert later.wait == pytest.approx(62.0)  # 70 s + the window, as if 62 s was never taken
    clock.now = start + 132.0 + 5.0  # late again, with another caller queued behind it
    queued = b.reserve(CONN)
    retried = b.reserve(CONN, held=later.reservation)
    assert retried.status is Status.RESERVED
    assert retried.reservation != queued.reservation
    assert retried.wait > queued.wait  # behind the caller that came on time
    assert b.usage(CONN).reserved == 2  # the late slot went back: no phantom call


def test_reservations_never_go_past_the_horizon(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, _ = frozen
    b = backend.make(capacity=1, window=600.0)
    assert b.take(CONN) == GRANTED
    assert b.reserve(CONN).status is Status.RESERVED  # 600 s ahead
    beyond = b.reserve(CONN)  # 1200 s ahead: past the 900 s horizon
    assert (beyond.status, beyond.wait) == (Status.REFUSED, 1200.0)


def test_acquire_with_reserve_raises_the_reservation(budget: Backend) -> None:
    b = budget.make(capacity=1, window=60.0)
    b.acquire(CONN, reserve=True)
    with pytest.raises(BudgetEmpty) as caught:
        b.acquire(CONN, reserve=True)
    assert caught.value.reservation is not None
    assert "reserved in" in str(caught.value)


def test_a_burst_of_waiting_callers_drains_at_the_budgets_rate(
    frozen: tuple[Backend, FrozenClock],
) -> None:
    """150 callers, 20 calls per 10 s: each waits once, for its own slot (no retry storm)."""
    backend, clock = frozen
    b = backend.make(capacity=20, window=10.0)
    start = clock.now
    answers = [b.reserve(CONN) for _ in range(150)]
    assert sum(a.granted for a in answers) == 20
    due = sorted(start + a.wait for a in answers)
    assert due[-1] - start <= 75.0  # 150 calls at 20 per 10 s
    # Replaying the calls at their slots keeps every 10 s window at 20 at most.
    for i in range(len(due) - 20):
        assert due[i + 20] - due[i] >= 10.0 - 1e-6


# -- a lost log ---------------------------------------------------------------------------------


def test_a_lost_state_refuses_one_window(frozen: tuple[Backend, FrozenClock]) -> None:
    """Redis restarted empty: up to C calls may have gone out in the last W."""
    backend, clock = frozen
    b = backend.make(capacity=3, window=60.0, fresh=False)
    start = clock.now
    assert b.peek(CONN) == refused(60.0)  # peek tells, writes nothing
    assert b.take(CONN) == refused(60.0)
    clock.now = start + 59.0
    assert b.take(CONN) == refused(1.0)
    clock.now = start + 60.0
    assert b.take(CONN) == GRANTED


def test_initialise_starts_a_new_connection_at_once(budget: Backend) -> None:
    b = budget.make(capacity=2, fresh=False)
    b.initialise(99)
    assert b.take(99) == GRANTED
    b.initialise(99)  # idempotent: the log stays
    assert b.take(99) == GRANTED
    assert b.take(99).status is Status.REFUSED


def test_a_reservation_from_before_the_loss_is_void(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=1, window=60.0)
    assert b.take(CONN) == GRANTED
    held = b.reserve(CONN)
    b.clear(CONN)  # the state is gone, as after Redis lost its data
    clock.now += held.wait
    answer = b.reserve(CONN, held=held.reservation)
    # Not honoured: the new state's whole first window is refused, so it queues after it.
    assert (answer.status, answer.wait) == (Status.RESERVED, 60.0)
    assert answer.reservation != held.reservation


def test_clear_forgets_log_and_state(budget: Backend) -> None:
    b = budget.make(capacity=1)
    b.take(CONN)
    b.clear(CONN)
    b.initialise(CONN)
    assert b.take(CONN) == GRANTED


# -- the guarantee: at most C in ANY window -----------------------------------------------------


def test_race_exactly_capacity_succeed(budget: Backend) -> None:
    capacity, threads = 25, 100
    b = budget.make(capacity=capacity)
    start = threading.Barrier(threads)

    def hammer(_: int) -> bool:
        start.wait()
        return b.take(CONN).granted

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(hammer, range(threads)))
    assert outcomes.count(True) == capacity
    assert b.usage(CONN).used == capacity


def test_no_window_ever_holds_more_than_capacity(budget: Backend) -> None:
    """Four threads hammer for 2.5 windows; no W-long window may hold C + 1 granted calls.

    A plain refilling bucket fails this: it grants C at once and C more within the window.
    """
    capacity, window, workers = 5, 0.3, 4
    b = budget.make(capacity=capacity, window=window)
    end = budget.now_us() + us(2.5 * window)
    granted: list[tuple[int, int]] = []
    lock = threading.Lock()

    def hammer() -> None:
        while True:
            lo, answer, hi = budget.timed(lambda: b.take(CONN))
            if lo > end:
                return
            if answer.granted:
                with lock:
                    granted.append((lo, hi))

    pool = [threading.Thread(target=hammer) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    # C + 1 calls whose brackets all fit in less than W would be a violation.
    for start_lo, _ in granted:
        ends = sorted(hi for lo, hi in granted if lo >= start_lo)
        if len(ends) > capacity:
            assert ends[capacity] - start_lo >= us(window), "C + 1 calls within one window"
    assert 2 * capacity <= len(granted) <= 3 * capacity  # used, not starved


def _take_in_a_process(
    url: str | None, data_dir: str | None, prefix: str, capacity: int, go: multiprocessing.Event
) -> int:
    log: LogBackend
    if url is not None:
        log = RedisLog(connect(Settings(redis_url=url)), Keys(prefix))
    else:
        assert data_dir is not None
        log = SqliteLog(SharedFile(data_dir))
    b = SlidingLogBudget(log, capacity=capacity, window_seconds=HOUR)
    go.wait(30)
    return sum(b.take(CONN).granted for _ in range(40))


@pytest.mark.parametrize("where", ["redis", "sqlite"])
def test_eight_racing_processes_get_exactly_capacity(
    where: str, key_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Eight processes, 40 takes each, one budget of 100 (Redis, or the embedded file that
    ``run``, the action commands and the Python API share)."""
    url = None
    if where == "redis":
        real = request.getfixturevalue("real_redis")
        options = real.connection_pool.connection_kwargs
        url = f"redis://{options['host']}:{options['port']}/{options.get('db', 0)}"
        log: LogBackend = RedisLog(real, Keys(key_prefix))
    else:
        log = SqliteLog(SharedFile(tmp_path))
    SlidingLogBudget(log, capacity=100).initialise(CONN)
    context = multiprocessing.get_context("spawn")
    go = context.Manager().Event()
    data_dir = None if url else str(tmp_path)
    with context.Pool(8) as pool:
        pending = [
            pool.apply_async(_take_in_a_process, (url, data_dir, key_prefix, 100, go))
            for _ in range(8)
        ]
        go.set()
        granted = [p.get(timeout=120) for p in pending]
    assert sum(granted) == 100


# -- HipChat's ceiling --------------------------------------------------------------------------


def test_observe_caps_calls_until_reset(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=10)
    b.observe(CONN, remaining=2, reset_at=clock.now + 30)
    assert b.take(CONN) == GRANTED
    assert b.take(CONN) == GRANTED
    assert b.take(CONN) == refused(30.0)
    reserved = b.reserve(CONN)  # a reservation waits for HipChat's reset too
    assert (reserved.status, reserved.wait) == (Status.RESERVED, 30.0)


def test_observe_ignores_missing_or_past_headers(budget: Backend) -> None:
    b = budget.make(capacity=3)
    now = budget.now_us() / 1e6
    b.observe(CONN, remaining=None, reset_at=now + 30)
    b.observe(CONN, remaining=0, reset_at=None)
    b.observe(CONN, remaining=0, reset_at=now - 1)
    b.observe(CONN, remaining=0, reset_at=float("nan"))
    assert b.take(CONN, 3) == GRANTED
    assert b.usage(CONN).hipchat_remaining is None


def test_observe_merges_out_of_order_reports(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=100)
    reset = float(int(clock.now) + 60)  # HipChat's reset is whole epoch seconds
    b.observe(CONN, remaining=10, reset_at=reset)
    b.observe(CONN, remaining=12, reset_at=reset)  # late answer, same window: older count
    assert b.usage(CONN).hipchat_remaining == 10
    b.observe(CONN, remaining=7, reset_at=reset)
    assert b.usage(CONN).hipchat_remaining == 7
    b.observe(CONN, remaining=50, reset_at=reset - 300)  # a previous window: stale
    assert b.usage(CONN).hipchat_remaining == 7
    b.observe(CONN, remaining=50, reset_at=reset + 300)  # the next window
    assert b.usage(CONN).hipchat_remaining == 50


def test_a_429_stops_everything_until_reset(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=10)
    now = clock.now
    b.observe(CONN, remaining=5, reset_at=now + 300)
    b.observe_429(CONN, reset_at=now + 60)  # refused: our 5 were wrong, whatever they said
    assert b.take(CONN) == refused(60.0)
    b.observe_429(CONN, reset_at=now + 30)  # a shorter zero does not lift the longer one
    assert b.peek(CONN) == refused(60.0)
    b.observe(CONN, remaining=3, reset_at=now + 30)  # stale headers change nothing
    assert b.peek(CONN) == refused(60.0)
    assert b.usage(CONN).used == 0  # a refused take spent nothing


def test_a_reservation_covers_only_the_calls_it_reserved(
    frozen: tuple[Backend, FrozenClock],
) -> None:
    """A caller that comes back wanting more calls than it reserved is not granted them on
    its reservation (each call beyond it would be one more in the window than the log holds):
    it queues again. Fewer calls than reserved are granted."""
    backend, clock = frozen
    b = backend.make(capacity=2, window=10.0)
    assert b.take(CONN, 2) == GRANTED
    one = b.reserve(CONN, 1)
    two = b.reserve(CONN, 2)
    assert (one.status, one.wait, two.status) == (Status.RESERVED, 10.0, Status.RESERVED)
    clock.now += one.wait
    more = b.reserve(CONN, 2, held=one.reservation)
    assert more.status is Status.RESERVED  # behind everyone who reserved meanwhile
    assert more.wait >= 10.0
    clock.now += two.wait - one.wait
    assert b.reserve(CONN, 1, held=two.reservation) == GRANTED


def test_no_answer_lifts_a_429_before_its_reset(frozen: tuple[Backend, FrozenClock]) -> None:
    """An answer that comes in after a 429 may have left HipChat before it (a call in flight
    on another worker while this one was refused): its headers, even announcing a later reset
    with calls to spare, do not lift the 429's stop before the 429's own reset."""
    backend, clock = frozen
    b = backend.make(capacity=10)
    now = clock.now
    b.observe(CONN, remaining=90, reset_at=now + 300)  # HipChat's 5-minute window
    b.observe_429(CONN, reset_at=now + 3)  # "X-Ratelimit-Reset: 3"
    b.observe(CONN, remaining=89, reset_at=now + 300)  # the late 200 of a call in flight
    assert b.peek(CONN) == refused(3.0)
    b.observe(CONN, remaining=50, reset_at=now + 600)
    assert b.peek(CONN) == refused(3.0)
    clock.now = now + 1
    b.observe_429(CONN, reset_at=now + 2)  # an earlier reset shortens nothing
    assert b.peek(CONN) == refused(2.0)
    clock.now = now + 3  # the 429's reset: HipChat's headers count again
    assert b.peek(CONN) == GRANTED
    b.observe(CONN, remaining=0, reset_at=now + 300)
    assert b.peek(CONN) == refused(297.0)


def test_the_later_of_log_and_ceiling_decides(frozen: tuple[Backend, FrozenClock]) -> None:
    backend, clock = frozen
    b = backend.make(capacity=1, window=60.0)
    b.take(CONN)
    b.observe_429(CONN, reset_at=clock.now + 10)
    assert b.peek(CONN) == refused(60.0)  # the log decides
    b.observe_429(CONN, reset_at=clock.now + 90)
    assert b.peek(CONN) == refused(90.0)  # the ceiling decides


# -- the gate between a client and the budget ---------------------------------------------------


def test_the_gate_spends_prepaid_calls_first(budget: Backend) -> None:
    b = budget.make(capacity=3)
    b.take(CONN, 2)
    gate = Gate(b, CONN, prepaid=2)
    gate.before_call()
    gate.before_call()
    assert b.usage(CONN).used == 2  # the prepaid calls took nothing more
    gate.before_call()
    with pytest.raises(BudgetEmpty):
        gate.before_call()


def test_the_gate_records_only_what_changes_the_budget(budget: Backend) -> None:
    b = budget.make(capacity=100)
    written: list[tuple[int | None, float | None]] = []
    original = b.observe

    def spy(connection_id: int, *, remaining: int | None, reset_at: float | None) -> None:
        written.append((remaining, reset_at))
        original(connection_id, remaining=remaining, reset_at=reset_at)

    b.observe = spy  # type: ignore[method-assign]
    gate = Gate(b, CONN)
    reset = budget.now_us() / 1e6 + 300
    for remaining in (99, 98, 97):  # one HipChat window, plenty left: the first tells all
        gate.observe(RateLimitInfo(limit=100, remaining=remaining, reset_at=reset))
    gate.observe(RateLimitInfo(limit=100, remaining=20, reset_at=reset))  # getting low
    gate.observe(RateLimitInfo(limit=100, remaining=90, reset_at=reset + 300))  # a new window
    gate.observe(RateLimitInfo(limit=None, remaining=None, reset_at=None))
    assert written == [(99, reset), (20, reset), (90, reset + 300)]
    gate.refused(reset + 60)
    assert b.take(CONN).status is Status.REFUSED


# -- nothing left behind, errors ----------------------------------------------------------------


def test_script_keys_share_one_cluster_slot(key_prefix: str) -> None:
    keys = Keys(key_prefix)
    slots = {key_slot(k.encode()) for k in (keys.budget_log(CONN), keys.budget_state(CONN))}
    assert len(slots) == 1


def test_the_log_never_holds_more_than_three_times_the_capacity(budget: Backend) -> None:
    b = budget.make(capacity=3, window=0.001)
    for _ in range(20):
        wait_until(lambda: b.take(CONN).granted)
    stamps, _, _, _ = budget.log.recent(CONN)
    assert 6 <= len(stamps) <= 9  # C for the rule, C more for usage, trimmed every C pushes
    assert stamps == sorted(stamps, reverse=True)


def test_bad_construction_is_refused(budget: Backend) -> None:
    with pytest.raises(ValueError, match="capacity"):
        SlidingLogBudget(budget.log, capacity=0)
    for window in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="window_seconds"):
            SlidingLogBudget(budget.log, window_seconds=window)
    for margin in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="margin_seconds"):
            SlidingLogBudget(budget.log, margin_seconds=margin)


def test_survives_a_script_cache_flush(key_prefix: str) -> None:
    # SCRIPT FLUSH empties the cache of the whole server: only on a private fake one, never on
    # the Redis other suites share.
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    b = SlidingLogBudget(RedisLog(r, Keys(key_prefix)), capacity=2, window_seconds=HOUR)
    b.initialise(CONN)
    assert b.take(CONN) == GRANTED
    r.script_flush()
    assert b.take(CONN) == GRANTED
    assert b.take(CONN).status is Status.REFUSED


def test_programming_errors_are_not_disguised(
    fakeredis_client: redis.Redis, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    fakeredis_client.set(keys.budget_log(CONN), "not a list")
    b = SlidingLogBudget(RedisLog(fakeredis_client, keys), capacity=2)
    b.initialise(CONN)
    with pytest.raises(redis.ResponseError):
        b.take(CONN)


@pytest.fixture
def fakeredis_client() -> redis.Redis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("credentials", [":s3cret-pw@", "hipchat:s3cret-pw@"])
def test_unreachable_redis_is_storage_unavailable(key_prefix: str, credentials: str) -> None:
    url = f"redis://{credentials}127.0.0.1:{closed_port()}/0"
    b = SlidingLogBudget(RedisLog(connect(Settings(redis_url=url)), Keys(key_prefix)))
    calls: list[Callable[[], object]] = [
        lambda: b.take(CONN),
        lambda: b.reserve(CONN),
        lambda: b.acquire(CONN),
        lambda: b.peek(CONN),
        lambda: b.observe(CONN, remaining=1, reset_at=time.time() + 60),
        lambda: b.observe_429(CONN, reset_at=time.time() + 60),
        lambda: b.initialise(CONN),
        lambda: b.clear(CONN),
        lambda: b.usage(CONN),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as caught:
            call()
        assert "s3cret-pw" not in str(caught.value)
        assert f"connection {CONN}" in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        assert caught.value.retry_after > 0


def test_an_unwritable_budget_file_is_storage_unavailable(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the data directory should be")
    b = SlidingLogBudget(SqliteLog(SharedFile(blocked)))
    with pytest.raises((StorageUnavailable, OSError)):
        b.take(CONN)


def test_translated_messages_never_carry_a_password() -> None:
    leaky = redis.ConnectionError(
        "Error connecting to redis://hipchat:s3cret-pw@10.0.0.5:6379/0 (password=s3cret-pw)"
    )
    with pytest.raises(StorageUnavailable) as caught, redis_errors("budget take", "connection 4"):
        raise leaky
    assert "s3cret-pw" not in str(caught.value)
    assert "10.0.0.5:6379" in str(caught.value)  # where it failed is still said
    assert caught.value.__cause__ is leaky
