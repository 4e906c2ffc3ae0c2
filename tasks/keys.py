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
        """List: the stamps (Redis TIME, microseconds) of the newest calls granted or reserved,
        newest first, at most the capacity (the sliding log :mod:`tasks.budget` keeps)."""
        return f"{self._conn(connection_id)}:budget-log"

    def budget_state(self, connection_id: int) -> str:
        """Hash {epoch, remaining, reset}: when the log began (its absence: the log was lost)
        and HipChat's own budget, which lowers ours until its reset. No expiry."""
        return f"{self._conn(connection_id)}:budget"

    def post_intent(self, connection_id: int, operation: str) -> str:
        """String: when an operation (an action task, a delivery) began posting, so that a
        redelivery of it looks for its own earlier post (:mod:`tasks.posts`)."""
        return f"{self._conn(connection_id)}:intent:{operation}"

    def own_posts(self, connection_id: int) -> str:
        """Sorted set: what the connection posted (message ids, notification fingerprints),
        scored by when; a poll does not fire on these (:mod:`tasks.posts`)."""
        return f"{self._conn(connection_id)}:own-posts"

    def poll_lease(self, connection_id: int) -> str:
        """String: owner of the running poll of this connection (SET NX PX)."""
        return f"{self._conn(connection_id)}:poll-lease"

    def poll_slot(self, connection_id: int) -> str:
        """String: marks that this connection was polled in the current interval."""
        return f"{self._conn(connection_id)}:poll-slot"

    def drain_request(self, subscription_id: int) -> str:
        """String: a drain found the lock busy; its holder drains once more (tasks.delivery)."""
        return f"{self.prefix}:{{sub:{subscription_id}}}:drain-request"

    def drain_lock(self, subscription_id: int) -> str:
        """String lock: one worker at a time drains a subscription's outbox, in order."""
        return f"{self.prefix}:{{sub:{subscription_id}}}:drain"
