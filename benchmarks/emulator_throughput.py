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
from typing import Any

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emulator import EmulatorServer
from tasks.client import HipChatClient

HISTORY_ITEMS = 75
ROUNDS = 7
Call = Callable[[], object]


class CannedTransport(BaseAdapter):
    """Answers every request with one recorded response: the client's own cost, no socket."""

    def __init__(self, recorded: requests.Response) -> None:
        super().__init__()
        self.status, self.body = recorded.status_code, recorded.content
        self.headers = dict(recorded.headers)

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: object
    ) -> requests.Response:
        response = requests.Response()
        response.status_code, response._content = self.status, self.body
        response.headers = CaseInsensitiveDict(self.headers)
        response.url, response.request = request.url or "", request
        return response

    def close(self) -> None:
        pass


def run_for(seconds: float, threads: int, call: Call) -> tuple[int, float]:
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


def overhead(seconds: float, through_client: Call, through_bare: Call) -> tuple[float, float]:
    """Median ms per call ``(client, bare)`` over alternating rounds of ``seconds`` in all."""
    client_ms: list[float] = []
    bare_ms: list[float] = []
    for _ in range(ROUNDS):
        for call, out in ((through_bare, bare_ms), (through_client, client_ms)):
            calls, elapsed = run_for(seconds / ROUNDS / 2, 1, call)
            out.append(elapsed / calls * 1000.0)
    return statistics.median(client_ms), statistics.median(bare_ms)


def setup(server: EmulatorServer) -> tuple[str, int]:
    state = server.state
    user = state.create_user("Bench User", "bench", "bench@example.com")
    token = state.create_token(user["id"])
    room = state.create_room("Bench Room", topic="benchmarks")
    for i in range(HISTORY_ITEMS):
        state.post_message(room["id"], user["id"], f"benchmark message {i}")
    return token, int(room["id"])


def session_on(transport: BaseAdapter | None) -> requests.Session:
    session = requests.Session()
    if transport is not None:
        session.mount("http://", transport)
    return session


def measure(args: argparse.Namespace, server: EmulatorServer) -> list[str]:
    token, room_id = setup(server)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    room_url = f"{server.base_url}/v2/room/{room_id}"
    cases: list[tuple[str, str, Callable[[HipChatClient], object]]] = [
        ("get_room", room_url, lambda c: c.get_room(room_id)),
        (
            f"latest_history ({HISTORY_ITEMS} items)",
            f"{room_url}/history/latest?max-results={HISTORY_ITEMS}",
            lambda c: c.latest_history(room_id, max_results=HISTORY_ITEMS),
        ),
    ]
    rate_lines, overhead_lines = [], []
    for name, url, use in cases:
        recorded = requests.get(url, headers=headers, timeout=(5.0, 30.0))
        for label, transport in (
            ("emulator over HTTP", None),
            ("canned, no socket", CannedTransport(recorded)),
        ):
            bare = session_on(transport)
            client = HipChatClient(server.base_url, token, session=session_on(transport))

            def through_bare(bare: requests.Session = bare, url: str = url) -> object:
                return bare.get(url, headers=headers, timeout=(5.0, 30.0)).json()

            def through_client(client: HipChatClient = client, use: Any = use) -> object:
                return use(client)

            for _ in range(50):  # warm the pool, the caches and the emulator
                through_client()
                through_bare()
            if transport is None:
                single, single_s = run_for(args.seconds, 1, through_client)
                multi, multi_s = run_for(args.seconds, args.threads, through_client)
                rate_lines.append(f"| {name} | {single / single_s:.0f} | {multi / multi_s:.0f} |")
            share = args.seconds if transport is None else args.seconds / 2
            c_ms, b_ms = overhead(share, through_client, through_bare)
            overhead_lines.append(
                f"| {name} | {label} | {c_ms:.3f} | {b_ms:.3f} | {c_ms - b_ms:+.3f} "
                f"| {c_ms / b_ms:.2f} |"
            )
            client.close()
            bare.close()
    return [
        f"| call | req/s, 1 thread | req/s, {args.threads} threads |",
        "| --- | ---: | ---: |",
        *rate_lines,
        "",
        f"Per-call overhead of HipChatClient over a bare requests.Session doing the same GET "
        f"(median of {ROUNDS} alternating rounds):",
        "",
        "| call | transport | client ms | bare ms | overhead ms | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *overhead_lines,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3.0)")
    parser.add_argument("--threads", type=int, default=4, help="threads for the parallel run (4)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1:
        parser.error("--seconds must be > 0 and --threads >= 1")
    command = shlex.join(["python", "benchmarks/emulator_throughput.py", *(argv or sys.argv[1:])])
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: {command}")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, requests {requests.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(f"seconds per measurement: {args.seconds}, threads: {args.threads}\n")
    server = EmulatorServer(port=0, rate_limit=10**9, flood_limit=10**9).start()
    try:
        print("\n".join(measure(args, server)))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
