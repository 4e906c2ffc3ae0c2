"""Every Redis key name the project uses, built in one place.

Keys of one connection share the hash tag ``{conn:<id>}`` so that every key a script
touches for that connection lives in one Redis Cluster slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "hipchat-poller"

    def _conn(self, connection_id: int) -> str:
        return f"{self.prefix}:{{conn:{connection_id}}}"

    def budget_log(self, connection_id: int) -> str:
        """Sorted set: the calls granted in the last window, scored by their Redis TIME in
        microseconds (the sliding log :mod:`tasks.budget` enforces)."""
        return f"{self._conn(connection_id)}:budget-log"

    def budget_ceiling(self, connection_id: int) -> str:
        """Hash {remaining, reset_at}: HipChat's own budget, which shrinks ours until reset."""
        return f"{self._conn(connection_id)}:budget-ceiling"

    def poll_lease(self, connection_id: int) -> str:
        """String: owner of the running poll of this connection (SET NX PX)."""
        return f"{self._conn(connection_id)}:poll-lease"

    def poll_slot(self, connection_id: int) -> str:
        """String: marks that this connection was polled in the current interval."""
        return f"{self._conn(connection_id)}:poll-slot"

    def drain_lock(self, subscription_id: int) -> str:
        """String lock: one worker at a time drains a subscription's outbox, in order."""
        return f"{self.prefix}:{{sub:{subscription_id}}}:drain"
