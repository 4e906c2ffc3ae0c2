"""What one poll send costs beat, on a Redis broker and on RabbitMQ.

Beat publishes every poll through ``ConnectionScheduler._send`` (worker/scheduler.py): in
pipelined batches on Redis, one message at a time on AMQP (kombu's ``Producer.batch`` has no
AMQP implementation). This sends ``--sends`` polls through it, ``--repeats`` times per broker,
and reports per send the median wall time (what caps beat's sends per second) and the CPU
time of this process (what beat pays), for:

* ``redis``: a private ``redis-server`` as the broker (the default deployment);
* ``amqp``: RabbitMQ with the project's settings (publisher confirms, polls transient);
* ``amqp, polls persistent``: the same with persistent polls, whose confirm waits for
  RabbitMQ's disk;
* ``amqp, no confirms``: the same without publisher confirms.

RabbitMQ is the machine's (127.0.0.1:5672, guest/guest); the run gets a virtual host of its
own, deleted after (``tests/rabbitmq.py``). The queue is purged after each repeat; nothing
consumes it. The connections table (SQLite, empty) is only what beat reads at start.

Reproduce (about 40 s):

    python benchmarks/broker_publish.py            # --sends 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from kombu import Connection, Exchange, Queue

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.settings import Settings
from tests.rabbitmq import RabbitVhost
from tests.redis_server import RedisServer
from tests.storage_support import opened, sqlite_url
from worker.app import POLL_QUEUE, create_app
from worker.scheduler import POLL_TASK, ConnectionScheduler, Message

PERSISTENT = 2


def measure(settings: Settings, sends: int, repeats: int, **conf: Any) -> tuple[float, float]:
    """(wall ms per send, CPU ms per send), medians over ``repeats``."""
    app = create_app(settings)
    app.conf.update(conf)
    scheduler = ConnectionScheduler(app, resume=False)
    messages = [Message(POLL_TASK, [i, 1], 60.0) for i in range(sends)]
    assert scheduler._send(messages[:100]) == 100  # connect and declare first
    walls, cpus = [], []
    try:
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            assert scheduler._send(messages) == sends
            walls.append((time.perf_counter() - wall) / sends * 1000)
            cpus.append((time.process_time() - cpu) / sends * 1000)
            with Connection(app.conf.broker_url) as conn:
                Queue(POLL_QUEUE, Exchange(POLL_QUEUE), routing_key=POLL_QUEUE)(
                    conn.default_channel
                ).purge()
    finally:
        app.close()
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with (
        tempfile.TemporaryDirectory() as tmp,
        RedisServer(Path(tmp) / "redis") as redis,
        RabbitVhost() as vhost,
    ):
        database = sqlite_url(Path(tmp))
        with opened(database, migrate=True):
            pass
        base = Settings(
            database_url=database,
            data_dir=tmp,
            redis_url=redis.url,
            secret_key=Fernet.generate_key().decode(),
        )
        amqp = base.with_(broker_url=vhost.url)
        persistent = {POLL_TASK: {"queue": POLL_QUEUE, "delivery_mode": PERSISTENT}}
        variants: list[tuple[str, Settings, dict[str, Any]]] = [
            ("redis", base, {}),
            ("amqp", amqp, {}),
            ("amqp, polls persistent", amqp, {"task_routes": persistent}),
            ("amqp, no confirms", amqp, {"broker_transport_options": {}}),
        ]
        print(f"{'broker':24} {'wall ms/send':>13} {'sends/s':>9} {'CPU ms/send':>12}")
        for name, settings, conf in variants:
            wall, cpu = measure(settings, args.sends, args.repeats, **conf)
            print(f"{name:24} {wall:13.3f} {1000 / wall:9,.0f} {cpu:12.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
