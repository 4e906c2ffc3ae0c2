"""Worker and beat in one process: the embedded mode of ``hipchat-poller run`` and the demo.

With no ``HIPCHAT_POLLER_REDIS_URL`` the broker is kombu's in-process memory transport and
the token bucket lives in an in-process fakeredis server, so the worker runs a thread pool
and beat runs as a thread of the same process (a forked beat would not share either).
With Redis configured, the same function runs a real worker with an embedded beat thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.beat import EmbeddedService

from worker.app import ACTION_QUEUE, POLL_QUEUE

log = logging.getLogger(__name__)


class EmbeddedWorker:
    """Start with :meth:`start`, stop with :meth:`stop`; or :meth:`run` in the foreground."""

    def __init__(
        self, app: Celery, *, concurrency: int = 4, loglevel: str = "WARNING", quiet: bool = False
    ) -> None:
        self.app = app
        self.beat: Any = EmbeddedService(app, thread=True, scheduler_cls=app.conf.beat_scheduler)
        self.worker: Any = app.Worker(
            pool="threads",
            concurrency=concurrency,
            queues=[POLL_QUEUE, ACTION_QUEUE],
            loglevel=loglevel,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            hostname=f"embedded@{threading.get_native_id()}",
            redirect_stdouts=False,
            quiet=quiet,
        )
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Run in the foreground until interrupted."""
        self.beat.start()
        try:
            self.worker.start()
        finally:
            self.beat.stop()

    def start(self) -> None:
        self.beat.start()
        self._thread = threading.Thread(target=self.worker.start, name="worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.beat.stop()
        self.worker.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(timeout=10)
