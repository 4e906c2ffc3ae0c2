"""Throughput of HipChatClient against the in-process emulator, and the client's own overhead.

    python benchmarks/emulator_throughput.py [--seconds N] [--threads N]

Starts the emulator on a free loopback port with its rate and flood limits out of the way,
then measures, for a cheap call (``get_room``) and for ``history/latest`` with 75 items:

* requests per second through HipChatClient, single-threaded and with ``--threads`` threads
  sharing one client;
* the client's per-call overhead: time per call through HipChatClient minus time per call
  with a bare ``requests.Session`` doing the same GET (Bearer header, timeout, ``json()``),
  and the ratio of the two. Bare and client runs alternate in short rounds and the median
  round counts, so a noisy machine skews both sides alike.

The server shares this process (and its GIL) with the client, so absolute figures are a floor
for what a real server would allow; the overhead figure is the point. ``--seconds`` is the time
per measurement; the default run takes about 25 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator import EmulatorServer
from tasks.client import HipChatClient

HISTORY_ITEMS = 75
ROUNDS = 5


def run_for(seconds: float, threads: int, call: Callable[[], object]) -> tuple[int, float]:
    """Call ``call`` in ``threads`` threads until ``seconds`` pass: ``(calls, elapsed)``."""
    counts = [0] * threads
    start_line = threading.Barrier(threads + 1)
    deadline = 0.0

    def worker(slot: int) -> None:
        start_line.wait()
        done = 0
        while time.perf_counter() < deadline:
            call()
            done += 1
        counts[slot] = done

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    started = time.perf_counter()
    deadline = started + seconds
    start_line.wait()
    for thread in pool:
        thread.join()
    return sum(counts), time.perf_counter() - started


def per_call_ms(seconds: float, call: Callable[[], object]) -> float:
    calls, elapsed = run_for(seconds, 1, call)
    return elapsed / calls * 1000.0


def setup(server: EmulatorServer) -> tuple[str, int]:
    state = server.state
    user = state.create_user("Bench User", "bench", "bench@example.com")
    token = state.create_token(user["id"])
    room = state.create_room("Bench Room", topic="benchmarks")
    for i in range(HISTORY_ITEMS):
        state.post_message(room["id"], user["id"], f"benchmark message {i}")
    return token, int(room["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (2.0)")
    parser.add_argument("--threads", type=int, default=4, help="threads for the parallel run (4)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1:
        parser.error("--seconds must be > 0 and --threads >= 1")

    server = EmulatorServer(port=0, rate_limit=10**9, flood_limit=10**9)
    server.start()
    try:
        token, room_id = setup(server)
        client = HipChatClient(server.base_url, token)
        bare = requests.Session()
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        api = f"{server.base_url}/v2/room/{room_id}"

        def bare_get(url: str) -> Callable[[], object]:
            return lambda: bare.get(url, headers=headers, timeout=(5.0, 30.0)).json()

        cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("get_room", lambda: client.get_room(room_id), bare_get(api)),
            (
                f"latest_history ({HISTORY_ITEMS} items)",
                lambda: client.latest_history(room_id, max_results=HISTORY_ITEMS),
                bare_get(f"{api}/history/latest?max-results={HISTORY_ITEMS}"),
            ),
        ]
        assert len(client.latest_history(room_id, max_results=HISTORY_ITEMS)) == HISTORY_ITEMS

        print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        command = shlex.join(["python", "benchmarks/emulator_throughput.py", *sys.argv[1:]])
        print(f"command: {command}")
        print(
            f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
            f"{platform.python_version()}, requests {requests.__version__}"
        )
        print(f"seconds per measurement: {args.seconds}, threads: {args.threads}\n")
        header = (
            f"{'call':<28}{'1 thread req/s':>16}{f'{args.threads} threads req/s':>18}"
            f"{'client ms':>11}{'bare ms':>9}{'overhead ms':>13}{'ratio':>7}"
        )
        print(header)
        print("-" * len(header))
        for name, through_client, through_bare in cases:
            for _ in range(50):  # warm the pool, caches and the emulator
                through_client()
                through_bare()
            single, single_s = run_for(args.seconds, 1, through_client)
            multi, multi_s = run_for(args.seconds, args.threads, through_client)
            slice_s = args.seconds / ROUNDS
            client_ms, bare_ms = [], []
            for _ in range(ROUNDS):
                bare_ms.append(per_call_ms(slice_s, through_bare))
                client_ms.append(per_call_ms(slice_s, through_client))
            c_ms, b_ms = statistics.median(client_ms), statistics.median(bare_ms)
            print(
                f"{name:<28}{single / single_s:>16.0f}{multi / multi_s:>18.0f}"
                f"{c_ms:>11.3f}{b_ms:>9.3f}{c_ms - b_ms:>13.3f}{c_ms / b_ms:>7.2f}"
            )
        client.close()
        bare.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
