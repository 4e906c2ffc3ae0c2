"""Beat's poll schedule (worker/poll_schedule.py): pure, no broker, no database, no Redis."""

from __future__ import annotations

import pytest

from worker.poll_schedule import STALE_MARGIN, PollSchedule, interval_index, resumed_index

INTERVAL = 60.0
T0 = 1_900_000_020.0  # a multiple of 60


def due_ids(schedule: PollSchedule, now: float, limit: int = 100) -> list[tuple[int, int]]:
    """Pop what is due and mark it sent; (connection, interval) in the order popped."""
    slots = schedule.pop_due(now, limit)
    for slot in slots:
        schedule.sent(slot)
    return [(slot.connection_id, slot.index - 1) for slot in slots]


@pytest.mark.parametrize(
    ("offset", "claimed", "expected"),
    [
        # current interval (k = 0 here) began 5 s ago
        (55.0, 0, 1),  # claimed: the next one, at its time
        (55.0, 1, 2),  # a later one claimed (another beat's clock ahead): after it
        (55.0, -1, 0),  # only the previous one claimed: this one, now
        (55.0, None, 0),  # nothing claimed, began recently: now
        # current interval began 40 s ago: longer than the catch-up window
        (20.0, 0, 1),
        (20.0, -1, 1),  # missed during a long outage: skipped
        (20.0, None, 1),
    ],
)
def test_resumed_index(offset: float, claimed: int | None, expected: int) -> None:
    base = interval_index(T0, INTERVAL, offset)
    stored = None if claimed is None else base + claimed
    assert resumed_index(T0, INTERVAL, offset, stored, catch_up_seconds=10.0) == base + expected


def test_due_slots_come_out_in_due_order_and_only_when_due() -> None:
    schedule = PollSchedule(INTERVAL)
    k = interval_index(T0, INTERVAL, 0.0)
    for conn_id, offset in ((1, 30.0), (2, 10.0), (3, 50.0)):
        schedule.add(conn_id, offset, k)  # due at T0 + offset
    assert schedule.next_due() == T0 + 10.0
    assert due_ids(schedule, T0 + 9.9) == []
    assert schedule.visits == 0
    assert due_ids(schedule, T0 + 35.0) == [(2, k), (1, k)]
    assert schedule.visits == 2
    assert schedule.next_due() == T0 + 50.0
    assert due_ids(schedule, T0 + 70.0) == [(3, k), (2, k + 1)]


def test_pop_due_takes_at_most_limit() -> None:
    schedule = PollSchedule(INTERVAL)
    for conn_id in range(10):
        schedule.add(conn_id, float(conn_id), interval_index(T0, INTERVAL, float(conn_id)))
    assert len(schedule.pop_due(T0, limit=4)) == 4
    assert len(schedule.pop_due(T0, limit=100)) == 6
    assert schedule.pop_due(T0, limit=100) == []


def test_a_slot_late_by_intervals_sends_the_current_one() -> None:
    schedule = PollSchedule(INTERVAL)
    k = interval_index(T0, INTERVAL, 5.0)
    schedule.add(1, 5.0, k)
    assert due_ids(schedule, T0 + 3 * INTERVAL) == [(1, k + 3)]
    assert schedule.next_due() == (k + 4) * INTERVAL + 5.0


def test_a_retried_slot_stays_due() -> None:
    schedule = PollSchedule(INTERVAL)
    k = interval_index(T0, INTERVAL, 5.0)
    schedule.add(1, 5.0, k)
    (slot,) = schedule.pop_due(T0, 10)
    schedule.retry(slot)
    assert due_ids(schedule, T0 + 1) == [(1, k)]


def test_dropped_and_replaced_slots_never_come_out() -> None:
    schedule = PollSchedule(INTERVAL)
    k = interval_index(T0, INTERVAL, 0.0)
    schedule.add(1, 10.0, k)
    schedule.add(2, 20.0, k)
    assert schedule.drop(1)
    assert not schedule.drop(1)
    schedule.add(2, 30.0, k)  # replaced: its old entry is stale
    schedule.add(1, 40.0, k)  # back, at another offset
    assert schedule.next_due() == T0 + 30.0
    assert due_ids(schedule, T0 + 45.0) == [(2, k), (1, k)]
    assert schedule.ids() == {1, 2}
    assert len(schedule) == 2


def test_many_drops_compact_the_heap_without_losing_a_slot() -> None:
    schedule = PollSchedule(INTERVAL)
    k = interval_index(T0, INTERVAL, 0.0)
    for conn_id in range(3000):
        schedule.add(conn_id, conn_id % 60, k + 1)
    for conn_id in range(3000):
        schedule.add(conn_id, conn_id % 60, k + 1)  # replaced: 3,000 stale entries
    for conn_id in range(1, 3000, 3):
        schedule.drop(conn_id)
    assert len(schedule._heap) <= 2 * len(schedule) + STALE_MARGIN  # compacted
    popped = due_ids(schedule, T0 + 2 * INTERVAL - 1, limit=10_000)
    assert sorted(conn_id for conn_id, _ in popped) == sorted(schedule.ids())
    assert len(popped) == 2000
