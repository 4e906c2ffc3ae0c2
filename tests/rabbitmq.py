"""A RabbitMQ virtual host of a test's own, on the machine's RabbitMQ (127.0.0.1:5672).

Celery's names in a broker are fixed: the ``hipchat.polls`` and ``hipchat.actions`` exchanges
and queues, ``celeryev`` (events), ``celery.pidbox`` (remote control), reply queues. Rather
than rename them per run, a test gets a virtual host of its own, in which every one of them
lives, and deletes it at the end, which deletes all of them at once. Nothing of a test
lingers in RabbitMQ, and tests on other worktrees of the machine never see each other::

    with RabbitVhost() as vhost:
        env["HIPCHAT_POLLER_BROKER_URL"] = vhost.url  # amqp://guest:guest@127.0.0.1:5672/<vhost>

Virtual hosts are created and deleted with ``rabbitmqctl`` (the management HTTP API is not
always enabled). A RabbitMQ that does not answer fails the test, never skips it, like Redis
and PostgreSQL (``.ci/run`` starts it). A vhost left behind by a run that was killed is
deleted by the next run once it is older than :data:`STALE_SECONDS`: its name carries the
time it was made.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from types import TracebackType

import pytest
from kombu import Connection

HOST = os.environ.get("HIPCHAT_POLLER_TEST_RABBITMQ_HOST", "127.0.0.1")
PORT = int(os.environ.get("HIPCHAT_POLLER_TEST_RABBITMQ_PORT", "5672"))
USER = "guest"  # RabbitMQ's default user, allowed from loopback only
PASSWORD = "guest"
PREFIX = "hp-test"
STALE_SECONDS = 3600.0  # no test run lasts this long
RABBITMQCTL_TIMEOUT = 60.0


def rabbitmqctl(*args: str) -> str:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args],
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        pytest.fail("rabbitmqctl is required (RabbitMQ's own tool) and is not on PATH")
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def vhosts() -> list[str]:
    return [line.strip() for line in rabbitmqctl("list_vhosts").splitlines()[1:] if line]


def require_rabbitmq() -> None:
    """Fail (not skip) unless RabbitMQ accepts an AMQP connection."""
    url = f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}//"
    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ is required at {HOST}:{PORT} and is not answering: {exc} "
            "(start it with `rabbitmq-server -detached`)"
        )


class RabbitVhost:
    def __init__(self) -> None:
        self.name = f"{PREFIX}-{int(time.time())}-{uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{PORT}/{self.name}"

    def start(self) -> RabbitVhost:
        require_rabbitmq()
        self._delete_stale()
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        return self

    def trace_on(self) -> None:
        """RabbitMQ's firehose for this vhost: a copy of every message published in it goes
        to its ``amq.rabbitmq.trace`` exchange (routing key ``publish.<exchange>``)."""
        rabbitmqctl("trace_on", "-p", self.name)

    def stop(self) -> None:
        """Delete the vhost with every exchange, queue and message in it; check it is gone."""
        rabbitmqctl("delete_vhost", self.name)
        assert self.name not in vhosts(), f"vhost {self.name} is still there"

    def __enter__(self) -> RabbitVhost:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _delete_stale() -> None:
        for name in vhosts():
            made = name.removeprefix(PREFIX + "-").partition("-")[0]
            ours = name.startswith(PREFIX + "-") and made.isdigit()
            if ours and time.time() - int(made) > STALE_SECONDS:
                rabbitmqctl("delete_vhost", name)
