"""What the benchmarks that start real services share.

* :func:`fresh_postgres`: a PostgreSQL database of the run's own, dropped at the end.
* :func:`cpu_seconds`, :func:`rss_bytes`, :func:`child_pids`: a process's CPU and memory from
  ``/proc`` (Linux only), so that processes we did not write (PostgreSQL, Redis) are measured
  the same way as ours.
* :func:`machine_state`: cores, load and the busiest processes on the machine right now, to
  print next to any figure measured on a shared machine.
* :func:`commit_of_product`: the commit measured, with a note when the product code differs.
* :func:`create_connections`: connections with one webhook subscription per room, through
  the storage layer.
* :func:`percentile`, :func:`fmt_ms`: the arithmetic every report uses.
* :func:`interrupt_on_signals`: SIGTERM and SIGHUP unwind like Ctrl-C, so that a script's
  ``finally`` blocks stop what it started.

Imported by the scripts in ``benchmarks/`` (which put the repository root on ``sys.path``);
it needs no pytest, only what the product already depends on.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import sqlalchemy

from storage import connections as conns
from storage import subscriptions as subs
from tasks.runtime import Runtime
from tasks.subscriptions_api import stored_target

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get(
    "HIPCHAT_POLLER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
PRODUCT_DIRS = ("worker", "tasks", "storage", "emulator")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- signals --------------------------------------------------------------------------------------


class Interrupted(Exception):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def interrupt_on_signals() -> None:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    # Also when started in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgDatabase:
    name: str
    url: str  # SQLAlchemy URL (postgresql+psycopg://...) of the new database
    admin_url: str  # libpq URL of the database we connected to in order to create it
    version: str


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@contextmanager
def fresh_postgres(
    admin_url: str = POSTGRES_ADMIN_URL, prefix: str = "bench"
) -> Iterator[PgDatabase]:
    """A new database on the server of ``admin_url``, dropped (``WITH (FORCE)``: its
    connections are ended) when the block ends, however it ends."""
    plain = _plain(admin_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(plain, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        found = admin.execute("SHOW server_version").fetchone()
    version = str(found[0]).split()[0] if found else "?"
    url = sqlalchemy.engine.make_url(plain.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        yield PgDatabase(
            name, url.set(database=name).render_as_string(hide_password=False), plain, version
        )
    finally:
        with psycopg.connect(plain, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- connections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conn:
    id: int
    offset: float  # seconds into each interval: the connection's slot
    rooms: tuple[int, ...]
    token: str
    user: int


def create_connections(
    rt: Runtime,
    base_url: str,
    specs: Sequence[dict[str, Any]],
    webhook_url: Callable[[int, str], str],
    interval: float,
    batch: int = 500,
) -> list[Conn]:
    """A connection per spec (``{"user", "token", "rooms": [[id, name], ...]}``) with a
    ``room_message`` webhook subscription per room, through the storage layer, ``batch``
    connections per transaction. ``webhook_url(connection id, secret)`` gives each
    connection's URL (and may register its secret with a receiver). Each room is stored as
    resolved, as the first poll's ``resolve_rooms`` would store it: no lookup call. Each
    connection's budget is started where the code has that step."""
    made: list[Conn] = []
    for start in range(0, len(specs), batch):
        with rt.db.session() as s:
            for i, spec in enumerate(specs[start : start + batch], start):
                row = conns.add_connection(
                    s,
                    f"bench-{i:05d}",
                    base_url,
                    spec["token"],
                    rt.cipher,
                    poll_interval_seconds=interval,
                )
                secret = secrets.token_urlsafe(16)
                url = webhook_url(row.id, secret)
                target = stored_target(rt, "webhook", {"url": url, "secret": secret})
                for room_id, room_name in spec["rooms"]:
                    sub = subs.add_subscription(
                        s, row.id, "room_message", room=room_name, target_kind="webhook",
                        target=target,
                    )  # fmt: skip
                    subs.set_room_id(s, sub.id, room_id, room_name)
                rooms = tuple(int(r[0]) for r in spec["rooms"])
                offset = row.poll_offset_seconds % interval
                made.append(Conn(row.id, offset, rooms, spec["token"], int(spec["user"])))
        # Newer code starts a new connection's budget (tasks.connections_api.start_budgets),
        # without which its first calls wait a whole window; older code has no such step.
        initialise = getattr(rt.budget, "initialise", None)
        if initialise is not None:
            for conn in made[start:]:
                initialise(conn.id)
    return made


# -- processes, from /proc ----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU of ``pid`` (all its threads); with ``reaped_children`` also that of
    its children that exited and were waited for. None if the process is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state is index 0, so utime/stime/cutime/cstime are 11..14.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def rss_bytes(pid: int) -> int | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
        return None
    return pages * _PAGE


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (of every thread of it)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return found
    for task in tasks:
        try:
            found += [int(x) for x in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def tree_cpu_seconds(pid: int) -> float | None:
    """A process and its children: the live ones, and the exited ones it has reaped (a
    pool child that was replaced still counts)."""
    own = cpu_seconds(pid, reaped_children=True)
    if own is None:
        return None
    return own + sum(cpu_seconds(c, reaped_children=True) or 0.0 for c in child_pids(pid))


def tree_rss_bytes(pid: int) -> int:
    return (rss_bytes(pid) or 0) + sum(rss_bytes(c) or 0 for c in child_pids(pid))


# -- the machine -------------------------------------------------------------------------------


def _all_cpu() -> dict[int, tuple[float, str]]:
    found: dict[int, tuple[float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cpu = cpu_seconds(pid)
        if cpu is None:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = (cpu, raw.replace(b"\0", b" ").decode(errors="replace").strip())
    return found


def machine_state(sample_seconds: float = 1.0, exclude: Sequence[int] = ()) -> str:
    """One paragraph: cores, load average, and every process that used more than 5 % of a
    core during ``sample_seconds`` (other engineers' test suites, typically)."""
    before = _all_cpu()
    time.sleep(sample_seconds)
    after = _all_cpu()
    busy = []
    for pid, (cpu, cmd) in after.items():
        if pid in exclude or pid == os.getpid() or pid not in before:
            continue
        share = (cpu - before[pid][0]) / sample_seconds
        if share >= 0.05 and cmd:
            busy.append((share, pid, cmd))
    busy.sort(reverse=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"{os.cpu_count()} cores, load average {load}"]
    if busy:
        lines.append("busy processes (share of one core over 1 s):")
        lines += [f"  {share:4.0%} {pid} {cmd[:110]}" for share, pid, cmd in busy[:8]]
    else:
        lines.append("no other process used more than 5 % of a core")
    return "\n".join(lines)


def commit_of_product() -> str:
    """The checkout's commit and the last commit that changed the product's code (what
    was measured), plus a note if the product's files have uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    product = git("log", "-1", "--format=%h (%ad, %s)", "--date=short", "--", *PRODUCT_DIRS)
    dirty = git("status", "--porcelain", "--", *PRODUCT_DIRS)
    found = f"{head}; product code as of {product[:100] or 'unknown'}"
    return found + (" + uncommitted changes to the product" if dirty else "")


# -- arithmetic --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def fmt_ms(seconds: float) -> str:
    """Seconds shown as milliseconds (``-`` for NaN)."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def fmt_s(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds:.2f}"
