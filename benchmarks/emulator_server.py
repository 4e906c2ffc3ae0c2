"""Capacity of the emulator when it has a process of its own, as the e2e tests and a demo
against ``hipchat-poller emulator`` use it.

    python benchmarks/emulator_server.py [--seconds N] [--clients N]

Starts ``python -m emulator`` on a free loopback port (rate limit out of the way), then
drives it for ``--seconds`` from 1 and from ``--clients`` client processes, each a bare
keep-alive ``requests.Session``, for a cheap call (``GET /v2/room/{id}``) and for
``history/latest`` with 75 items. Prints requests per second in total and the ratio to the
single-client run of the same call (the baseline of the same run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime

import requests

TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hammer(base: str, path: str, seconds: float, out: multiprocessing.Queue[int]) -> None:
    session = requests.Session()
    session.trust_env = False
    headers = {"Authorization": f"Bearer {TOKEN}"}
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.get(base + path, headers=headers, timeout=10).raise_for_status()
        count += 1
    out.put(count)


def measure(base: str, path: str, seconds: float, clients: int) -> float:
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=hammer, args=(base, path, seconds, queue))
        for _ in range(clients)
    ]
    for proc in procs:
        proc.start()
    total = sum(queue.get(timeout=seconds + 30) for _ in procs)
    for proc in procs:
        proc.join()
    return total / seconds


def wait_up(base: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/v2/capabilities", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise SystemExit("the emulator did not start")


def seed(base: str) -> int:
    control = requests.Session()
    room = control.post(base + "/_emulator/rooms", json={"name": "Bench"}, timeout=10).json()
    for i in range(75):
        control.post(
            f"{base}/_emulator/rooms/{room['id']}/messages",
            json={"user": "@AliceA", "message": f"message {i}"},
            timeout=10,
        ).raise_for_status()
    return int(room["id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator",
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--rate-limit",
            "1000000000",
            "--flood-limit",
            "1000000000",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_up(base)
        room_id = seed(base)
        print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(
            f"command: python benchmarks/emulator_server.py --seconds {args.seconds:g} "
            f"--clients {args.clients}"
        )
        print(
            f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
            f"load average {os.getloadavg()[0]:.2f} at start"
        )
        print()
        print(f"| call | req/s, 1 client | req/s, {args.clients} clients | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for name, path in (
            ("GET /v2/room/{id}", f"/v2/room/{room_id}"),
            ("GET history/latest (75 items)", f"/v2/room/{room_id}/history/latest"),
        ):
            one = measure(base, path, args.seconds, 1)
            many = measure(base, path, args.seconds, args.clients)
            print(f"| {name} | {one:.0f} | {many:.0f} | {many / one:.2f} |")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
