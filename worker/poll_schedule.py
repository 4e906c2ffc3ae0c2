"""Beat's poll schedule: a heap of (due time, connection), so that a tick touches only what
is due.

Time is cut into numbered intervals: interval ``k`` of a connection starts at
``k * interval + offset``. A :class:`Slot` holds the next interval to send for one connection;
the heap orders slots by that interval's start. Removing a connection only forgets its slot:
its heap entry goes stale and is skipped when it reaches the top (the heap is rebuilt when
stale entries outnumber live ones), so no tick walks every connection.

Pure: no Celery, no Redis, no database; the scheduler (:mod:`worker.scheduler`) feeds it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

STALE_MARGIN = 1024


def interval_index(now: float, interval: float, offset: float) -> int:
    """Number of the interval that ``now`` falls in, for a connection with ``offset``."""
    return math.floor((now - offset) / interval)


def interval_start(index: int, interval: float, offset: float) -> float:
    return index * interval + offset


def next_start(index: int, interval: float, offset: float) -> float:
    return interval_start(index + 1, interval, offset)


def resumed_index(
    now: float, interval: float, offset: float, claimed: int | None, catch_up_seconds: float
) -> int:
    """The first interval a restarted beat sends for a connection whose last claimed interval
    (:meth:`tasks.lease.Leases.claim_interval`) is ``claimed`` (None: no claim in Redis).

    * the current interval is claimed: it was polled, the next one follows at its time;
    * it is not, and it began at most ``catch_up_seconds`` ago: beat was down only briefly,
      it goes now;
    * it is not, and it began earlier: a long outage; the missed slot is skipped and the
      next interval follows at its time, so a restart never floods the workers.
    """
    current = interval_index(now, interval, offset)
    if claimed is not None and claimed >= current:
        return claimed + 1
    if now - interval_start(current, interval, offset) <= catch_up_seconds:
        return current
    return current + 1


@dataclass(eq=False, slots=True)
class Slot:
    """One connection's place in the schedule; ``index`` is the next interval to send."""

    connection_id: int
    offset_seconds: float
    index: int


class PollSchedule:
    """The scheduled connections, each with one live :class:`Slot` in a heap by due time.

    ``visits`` counts the heap entries a :meth:`pop_due` or :meth:`next_due` looked at: the
    work a tick did, which is O(due connections), never O(all)."""

    def __init__(self, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self.visits = 0
        self._slots: dict[int, Slot] = {}
        self._heap: list[tuple[float, int, Slot]] = []
        self._order = itertools.count()  # ties on due time never compare two slots

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, connection_id: object) -> bool:
        return connection_id in self._slots

    def ids(self) -> set[int]:
        return set(self._slots)

    def offset(self, connection_id: int) -> float | None:
        slot = self._slots.get(connection_id)
        return None if slot is None else slot.offset_seconds

    def add(self, connection_id: int, offset_seconds: float, index: int) -> None:
        """Schedule interval ``index`` (and the ones after it), replacing any earlier slot."""
        slot = Slot(connection_id, offset_seconds, index)
        replaced = self._slots.get(connection_id) is not None
        self._slots[connection_id] = slot
        self._push(slot)
        if replaced:
            self._compact_if_stale()

    def drop(self, connection_id: int) -> bool:
        """Forget a connection; False if it was not scheduled."""
        if self._slots.pop(connection_id, None) is None:
            return False
        self._compact_if_stale()
        return True

    def pop_due(self, now: float, limit: int) -> list[Slot]:
        """Take up to ``limit`` slots due at ``now``, earliest first, each with ``index`` set to
        the interval to send now: its own, or the current one if beat fell a whole interval
        behind (a broker outage), so that only the latest missed interval is sent."""
        due: list[Slot] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(due) < limit:
            self.visits += 1
            _, _, slot = heapq.heappop(heap)
            if self._slots.get(slot.connection_id) is not slot:
                continue  # dropped or replaced since it was pushed
            current = interval_index(now, self.interval, slot.offset_seconds)
            slot.index = max(slot.index, current)
            due.append(slot)
        return due

    def sent(self, slot: Slot) -> None:
        """The slot's interval went out: the next one is due at its start."""
        slot.index += 1
        self._push(slot)

    def retry(self, slot: Slot) -> None:
        """The slot's interval could not be sent: it stays due, for the next tick."""
        self._push(slot)

    def next_due(self) -> float | None:
        """When the earliest live slot falls due; None if nothing is scheduled."""
        heap = self._heap
        while heap:
            due, _, slot = heap[0]
            if self._slots.get(slot.connection_id) is slot:
                return due
            self.visits += 1
            heapq.heappop(heap)
        return None

    def _push(self, slot: Slot) -> None:
        due = interval_start(slot.index, self.interval, slot.offset_seconds)
        heapq.heappush(self._heap, (due, next(self._order), slot))

    def _compact_if_stale(self) -> None:
        """Rebuild the heap once its stale entries outnumber the live ones (and a margin),
        so that dropping connections costs O(1) each, amortised."""
        if len(self._heap) <= 2 * len(self._slots) + STALE_MARGIN:
            return
        live = self._slots
        self._heap = [entry for entry in self._heap if live.get(entry[2].connection_id) is entry[2]]
        heapq.heapify(self._heap)
