"""Budget takes per second against real Redis, next to a plain INCR round trip and to the
`limits` library's moving window (the same "at most N in any window" guarantee), in one run.

Reproduce (Redis on loopback, from the repository root):

    python -m benchmarks.bucket_throughput --seconds 2 --repeats 3 --threads 4

The ratio take/INCR is the figure that travels between machines: both are one round trip, so
it shows what the script and its client code cost on top of the network. Keys live under a
unique prefix and are deleted afterwards; nothing else in the database is touched.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import redis
from limits import RateLimitItemPerHour, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from tasks.budget import RedisLog, SlidingLogBudget
from tasks.keys import Keys
from tasks.redis_conn import connect
from tasks.settings import Settings

DEFAULT_URL = os.environ.get("HIPCHAT_POLLER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def rate(call: Callable[[], object], seconds: float, threads: int) -> float:
    """Calls per second of ``call`` run by ``threads`` threads for ``seconds``."""
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def work(slot: int) -> None:
        start.wait()
        n = 0
        while not stop.is_set():
            call()
            n += 1
        counts[slot] = n

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    client = connect(Settings(redis_url=args.url))
    keys = Keys(f"hp-bench-{uuid.uuid4().hex[:12]}")
    log = RedisLog(client, keys)
    # Granted path: a capacity above the calls a run can make, so every take is granted.
    granted = SlidingLogBudget(log, capacity=1000, window_seconds=0.001)
    granted.initialise(1)
    # Refused path: production settings with the budget spent.
    refused = SlidingLogBudget(log, capacity=100, window_seconds=60.0)
    refused.initialise(2)
    refused.take(2, 100)
    counter = f"{keys.prefix}:incr"
    # limits' moving window on the same Redis: the granted path with room to spare, the
    # refused path with its window full.
    moving = MovingWindowRateLimiter(RedisStorage(args.url))
    roomy, full = RateLimitItemPerSecond(10**9), RateLimitItemPerHour(100)
    for _ in range(100):
        moving.hit(full, keys.prefix, "full")

    rows: list[tuple[str, int, float, float]] = []
    cases: tuple[tuple[str, Callable[[], object]], ...] = (
        ("take, granted", partial(granted.take, 1)),
        ("take, refused", partial(refused.take, 2)),
        ("limits moving window, granted", partial(moving.hit, roomy, keys.prefix, "roomy")),
        ("limits moving window, refused", partial(moving.hit, full, keys.prefix, "full")),
    )
    try:
        for threads in (1, args.threads):
            # Interleave baseline and takes, median of repeats: other load on the machine then
            # weighs on both sides of the ratio alike.
            samples: dict[str, list[float]] = {"INCR (baseline)": []}
            samples.update({label: [] for label, _ in cases})
            for _ in range(args.repeats):
                incr = rate(lambda: client.incr(counter), args.seconds, threads)
                samples["INCR (baseline)"].append(incr)
                for label, call in cases:
                    samples[label].append(rate(call, args.seconds, threads))
            baseline = statistics.median(samples["INCR (baseline)"])
            for label, values in samples.items():
                per_second = statistics.median(values)
                rows.append((label, threads, per_second, per_second / baseline))
        server = client.info("server")
    finally:
        for pattern in (f"{keys.prefix}*", f"*{keys.prefix}*"):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)

    print(f"date: {datetime.now(UTC).date().isoformat()}")
    print(
        f"redis {server['redis_version']} at {redis_location(client)}, redis-py {redis.__version__}"
    )
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus")
    print(
        "reproduce: python -m benchmarks.bucket_throughput "
        f"--seconds {args.seconds:g} --repeats {args.repeats} --threads {args.threads}"
    )
    print(f"median of {args.repeats} runs of {args.seconds:g} s each")
    print(f"{'operation':<30} {'threads':>7} {'ops/s':>10} {'vs INCR':>8}")
    for label, threads, per_second, ratio in rows:
        print(f"{label:<30} {threads:>7} {per_second:>10,.0f} {ratio:>8.2f}")


def redis_location(client: redis.Redis) -> str:
    options = client.connection_pool.connection_kwargs
    return f"{options.get('host', '?')}:{options.get('port', '?')}/{options.get('db', 0)}"


if __name__ == "__main__":
    main()
