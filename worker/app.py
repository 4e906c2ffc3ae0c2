"""The Celery application: queues, routes, serialisation, events for Flower.

Built by :func:`create_app` from an explicit :class:`~tasks.settings.Settings`; the module
``worker.celery_app`` builds the one instance that ``celery -A`` and the CLI use.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from tasks.celery_tasks import ACTION_TASKS
from tasks.runtime import Runtime
from tasks.settings import Settings
from worker import broker as broker_transport

POLL_QUEUE = "hipchat.polls"
ACTION_QUEUE = "hipchat.actions"
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")

# A poll is not written to the broker's disk (RabbitMQ: transient; Redis ignores it). Beat
# sends every connection's poll again each interval and the claim in Redis keeps it from
# running twice, so a restarted broker loses no poll that matters, while RabbitMQ confirms a
# persistent message only once it is on disk: about 1 ms a message here, which would cap beat
# below the 833 sends a second of 50,000 connections (docs/scaling.md, "Beyond one machine").
TRANSIENT = 1

TASK_ROUTES = {
    "hipchat.poll_connection": {"queue": POLL_QUEUE, "delivery_mode": TRANSIENT},
    "hipchat.relay_outbox": {"queue": POLL_QUEUE},
    "hipchat.purge_outbox": {"queue": POLL_QUEUE},
    "hipchat.deliver": {"queue": ACTION_QUEUE},
    "hipchat.action.*": {"queue": ACTION_QUEUE},
}


def broker_url_for(settings: Settings) -> str:
    if settings.broker_url:
        return settings.broker_url
    if settings.redis_url:
        return settings.redis_url
    return "memory://localhost/"


def time_limits(settings: Settings) -> dict[str, dict[str, float]]:
    """Soft and hard time limits per task (prefork pool): a task past its soft limit gets
    :class:`~celery.exceptions.SoftTimeLimitExceeded` and cleans up (locks are released, a poll
    records the streams it did not reach, an action retries); one past its hard limit is
    killed and its message comes back. Each is well above what the task can take when
    HipChat answers within the HTTP timeouts."""
    call = settings.http_connect_timeout_seconds + settings.http_read_timeout_seconds
    poll = max(60.0, settings.poll_interval_seconds) + call
    drain = 60.0 + settings.webhook_timeout_seconds + call  # tasks.delivery's time per drain
    action = 3 * call + 10.0  # the room, the call, and a look for an earlier post
    limits = {
        "hipchat.poll_connection": poll,
        "hipchat.deliver": drain,
        "hipchat.relay_outbox": 60.0,
        **dict.fromkeys(ACTION_TASKS, action),
    }
    return {
        name: {"soft_time_limit": soft, "time_limit": soft + 30.0} for name, soft in limits.items()
    }


# How often each worker looks for messages a dead worker held whose visibility timeout has
# passed (kombu's Redis transport). kombu 5.7 scans Redis only on every
# unacked_restore_throttle-th look, 10 by default: such messages came back up to 100 s after
# their timeout. A throttle of 1 brings them back within this many seconds of it.
RESTORE_INTERVAL_SECONDS = 10


def transport_options(broker: str, settings: Settings) -> dict[str, float | bool]:
    if broker.startswith("memory://"):
        # Polling the in-process memory broker every second would make the embedded demo lag.
        return {"polling_interval": 0.1}
    if broker.startswith(AMQP_SCHEMES):
        # A publish returns once RabbitMQ has taken the message, as an LPUSH does on Redis:
        # a retry, a drain or an action sent just before the connection broke is not lost
        # without a word. RabbitMQ has no visibility timeout: a message a worker holds
        # (running, or waiting for its countdown) comes back when that worker's connection
        # closes, and RabbitMQ closes a channel whose delivery stays unacknowledged longer
        # than its consumer_timeout (30 min by default), which must therefore outlast every
        # countdown (docs/scaling.md, "Beyond one machine").
        return {"confirm_publish": True}
    return {
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        "unacked_restore_interval": RESTORE_INTERVAL_SECONDS,
        "unacked_restore_throttle": 1,
    }


def result_backend_for(settings: Settings, broker: str) -> str:
    """Where the action tasks keep their results: Redis. Celery's Redis backend cannot use
    a Redis Cluster: then the broker's own Redis, or RabbitMQ's replies (``rpc://``, read
    by the process that sent the task)."""
    if settings.redis_cluster:
        return broker if broker.startswith(("redis://", "rediss://")) else "rpc://"
    return settings.redis_url or "cache+memory://"


def create_app(settings: Settings) -> Celery:
    broker_transport.install()  # the Redis transport with one client per channel
    app = Celery("hipchat_poller", set_as_current=True)
    broker = broker_url_for(settings)
    app.conf.update(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        task_default_queue=ACTION_QUEUE,
        task_queues=[
            Queue(POLL_QUEUE, Exchange(POLL_QUEUE), routing_key=POLL_QUEUE),
            Queue(ACTION_QUEUE, Exchange(ACTION_QUEUE), routing_key=ACTION_QUEUE),
        ],
        task_routes=TASK_ROUTES,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Polls and deliveries keep no result; the action tasks do, for send_task callers.
        task_ignore_result=True,
        result_backend=result_backend_for(settings, broker),
        result_expires=3600,
        # A task is acknowledged after it ran, so a worker that dies mid-task gives it back;
        # every task is idempotent (leases, outbox keys) so a redelivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Flower sees every task. Beat's own sends (a poll per connection per interval, the
        # relay) skip the task-sent event and the result channel: worker/scheduler.py.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        task_annotations=time_limits(settings),
        # Messages a worker holds (running, or waiting for their countdown) come back to the
        # queue this long (plus at most RESTORE_INTERVAL_SECONDS) after a worker died holding
        # them; it must outlast every countdown the project uses (see time_limits and
        # docs/reliability.md).
        broker_transport_options=transport_options(broker, settings),
        beat_scheduler="worker.scheduler:ConnectionScheduler",
        beat_max_loop_interval=min(5.0, settings.poll_interval_seconds),
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
        imports=["tasks.celery_tasks"],
    )
    Runtime.attach(app, settings)
    return app
