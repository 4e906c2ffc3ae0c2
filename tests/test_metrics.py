"""Metrics: the counters move for each outcome, the store collector reads what status reads,
multiprocess files are merged per process group, and the command refuses bad input.

The hooks run here in this process, where ``prometheus_client`` keeps its in-process registry
(nothing sets ``PROMETHEUS_MULTIPROC_DIR`` in the test process); multiprocess mode is tested
in subprocesses, which is the only way to choose it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from storage.errors import BucketEmpty, RateLimited, RetryLater
from tasks import metrics
from tasks.delivery import drain
from tasks.poll import PollResult
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.cli_support import ROOT, Cli
from tests.conftest import REDIS_URL
from tests.pipeline_support import Pipeline, Receiver
from worker.metrics_server import MetricsServer, ProcessFiles
from worker.metrics_store import StoreCollector, families, read_store

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


def value(name: str, **labels: str) -> float:
    """A sample of this process's registry; 0 while its family was not made yet."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Moved:
    """How much samples of this process's registry moved since it was made."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = [value(name, **labels) for name, labels in samples]

    def __call__(self) -> list[float]:
        now = [value(name, **labels) for name, labels in self.samples]
        return [after - before for after, before in zip(now, self.before, strict=True)]


def polls(outcome: str) -> tuple[str, dict[str, str]]:
    return "hipchat_poller_polls_total", {"outcome": outcome}


def calls(status: str) -> tuple[str, dict[str, str]]:
    return "hipchat_poller_hipchat_calls_total", {"status": status}


DURATIONS = ("hipchat_poller_poll_duration_seconds_count", {})


def timed_poll(p: Pipeline, rt: Runtime | None = None) -> PollResult:
    """A poll as the task runs it: in a PollTimer; a RetryLater is the task's to retry."""
    result = PollResult(p.conn_id)
    try:
        with metrics.PollTimer(result):
            p.poll(rt, result=result)
    except RetryLater:
        pass
    return result


# -- polls and HipChat calls ----------------------------------------------------------------------
@SQLITE
def test_polls_are_counted_by_outcome(pipeline: Pipeline) -> None:
    p = pipeline
    other = p.state.create_room("Other")
    p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    moved = Moved(
        polls("ok"), polls("partial"), polls("failed"), polls("skipped"), DURATIONS, calls("200")
    )
    timed_poll(p)  # primes both rooms
    first = moved()
    assert first[:5] == [1, 0, 0, 0, 1]
    assert first[5] >= 2  # a history call per room at least, every one answered 200

    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{other['id']}/history")
    assert timed_poll(p).failing  # one room of two
    assert moved()[:5] == [1, 1, 0, 0, 2]
    name, labels = calls("5xx")
    assert value(name, **labels) >= 1

    p.state.revoke_token(p.token)
    assert timed_poll(p).problems  # 401: nothing read, the connection paused
    assert timed_poll(p).skipped  # paused: nothing to poll
    assert moved()[:5] == [1, 1, 1, 1, 3]  # a skipped poll has no duration


@SQLITE
def test_a_spent_budget_and_a_429_are_waits(pipeline: Pipeline) -> None:
    p = pipeline
    p.state.create_room("Other")
    p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    timed_poll(p)
    moved = Moved(
        polls("waiting"),
        calls("429"),
        ("hipchat_poller_rate_limited_total", {"kind": "rate_limit"}),
        ("hipchat_poller_budget_waits_total", {}),
    )
    tight = p.backend.runtime(bucket_capacity=1)  # two rooms, one call
    tight.budget.clear(p.conn_id)
    tight.budget.initialise(p.conn_id)
    timed_poll(p, tight)
    assert moved() == [1, 0, 0, 1]

    p.state.inject_fault("status", status=429, path_prefix=f"/v2/room/{p.room_id}/history")
    timed_poll(p)
    assert moved() == [2, 1, 1, 1]


def test_call_statuses_have_bounded_labels() -> None:
    assert [metrics.status_label(s) for s in (200, 204, 302, 404, 418, 429, 500, 503)] == [
        "200", "204", "3xx", "404", "4xx", "429", "5xx", "5xx",
    ]  # fmt: skip
    assert metrics.status_label("ReadTimeout") == "transport_error"
    assert metrics.status_label("InvalidURL") == "error"
    moved = Moved(calls("transport_error"))
    metrics.http_call("hipchat", "ConnectionError", 0.01)
    metrics.http_call("webhook", "ConnectionError", 0.01)  # a delivery, counted as one
    assert moved() == [1]


@SQLITE
def test_detection_lag_is_observed_when_the_events_commit(pipeline: Pipeline) -> None:
    p = pipeline
    p.subscribe("room_message")
    p.subscribe("room_enter")  # participant events carry no item date: no lag
    timed_poll(p)
    lag = Moved(
        ("hipchat_poller_detection_lag_seconds_count", {}),
        ("hipchat_poller_detection_lag_seconds_sum", {}),
    )
    p.say("one")
    p.say("two")
    started = time.time()
    assert timed_poll(p).event_count >= 2
    count, total = lag()
    assert count == 2
    assert 0 <= total <= 2 * (time.time() - started + 5)


@SQLITE
def test_no_lag_is_observed_when_the_transaction_rolls_back(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.add_events(sub.id, 1)
    lag = Moved(("hipchat_poller_detection_lag_seconds_count", {}))
    row = p.events()[0]
    row.payload = {"item": {"message": {"date": datetime.now(UTC).isoformat()}}}

    def rolled_back() -> None:
        with p.rt.db.session() as s:
            metrics.detection_lag_on_commit(s, [row])
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        rolled_back()
    assert lag() == [0]
    with p.rt.db.session() as s:
        metrics.detection_lag_on_commit(s, [row])
    assert lag() == [1]


# -- deliveries -------------------------------------------------------------------------------
def deliveries(outcome: str, kind: str = "webhook") -> tuple[str, dict[str, str]]:
    return "hipchat_poller_deliveries_total", {"outcome": outcome, "target_kind": kind}


@SQLITE
def test_deliveries_are_counted_by_outcome_and_target(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    p = pipeline
    hook = p.subscribe("room_message", kind="webhook", target={"url": receiver.url}).id
    logged = p.subscribe("room_enter", kind="log").id
    moved = Moved(
        deliveries("delivered"),
        deliveries("retry"),
        deliveries("dead"),
        deliveries("delivered", "log"),
        ("hipchat_poller_delivery_duration_seconds_count", {"target_kind": "webhook"}),
    )
    p.add_events(hook, 1)
    p.add_events(logged, 2, first=10)
    assert drain(p.rt, hook).delivered == 1
    assert drain(p.rt, logged).delivered == 2
    assert moved() == [1, 0, 0, 2, 1]

    receiver.answer(500)
    p.add_events(hook, 1, first=20)
    assert drain(p.rt, hook).retry_after is not None
    receiver.answer(410)  # gone: dead at once
    assert drain(p.rt, hook, now=datetime.now(UTC).replace(year=2099)).dead == 1
    assert moved() == [1, 1, 1, 2, 3]


def test_a_delivery_that_must_wait_is_no_failure() -> None:
    moved = Moved(deliveries("waiting", "action"), deliveries("retry", "action"))
    metrics.delivery_finished("action", 0.01, RateLimited("flood control", 30.0))
    metrics.delivery_finished("action", 0.01, BucketEmpty("budget spent", 3.0))
    metrics.delivery_finished("nonsense", 0.01)  # an unknown kind is dropped, never raised
    assert moved() == [2, 0]


# -- the stores, read at scrape time ------------------------------------------------------------
def samples(reading: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families(reading)
        for s in family.samples
    }


@SQLITE
def test_the_store_collector_reads_budgets_health_and_outbox(
    pipeline: Pipeline, receiver: Receiver
) -> None:
    p = pipeline
    other = p.state.create_room("Other")
    sub = p.subscribe("room_message", kind="webhook", target={"url": receiver.url}).id
    p.subscribe("room_message", room="Other")
    p.poll()
    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{other['id']}", count=5)
    p.poll()
    p.rt.health.flush()
    p.add_events(sub, 3)
    receiver.answer(410)
    drain(p.rt, sub)  # the first is dead; 410 puts the subscription in error, the rest wait
    conn = str(p.conn_id)

    reading = read_store(p.rt, datetime.now(UTC), limit=10, deadline=time.monotonic() + 5)
    found = samples(reading)
    assert found[("hipchat_poller_store_up", (("store", "database"),))] == 1
    assert found[("hipchat_poller_store_up", (("store", "budget"),))] == 1
    assert found[("hipchat_poller_connections", (("state", "active"),))] == 1
    assert found[("hipchat_poller_connections", (("state", "paused"),))] == 0
    assert found[("hipchat_poller_budget_capacity_calls", ())] == 100_000
    used = found[("hipchat_poller_budget_used_calls", (("connection", conn),))]
    assert used >= 4  # two polls of two rooms
    hipchat = found[("hipchat_poller_hipchat_remaining_calls", (("connection", conn),))]
    assert hipchat > 0  # the emulator's X-Ratelimit-Remaining
    assert found[("hipchat_poller_budget_remaining_calls", (("connection", conn),))] == min(
        100_000 - used, hipchat
    )
    assert found[("hipchat_poller_connection_failing_rooms", (("connection", conn),))] == 1
    age = found[("hipchat_poller_connection_last_ok_poll_age_seconds", (("connection", conn),))]
    assert 0 <= age < 60
    outbox = {
        labels: n for (name, labels), n in found.items() if name == "hipchat_poller_outbox_events"
    }
    assert outbox == {
        (("connection", conn), ("state", "dead"), ("subscription", str(sub))): 1,
        (("connection", conn), ("state", "pending"), ("subscription", str(sub))): 2,
    }
    assert found[("hipchat_poller_store_connections_omitted", ())] == 0

    bounded = samples(read_store(p.rt, datetime.now(UTC), limit=0, deadline=time.monotonic() + 5))
    assert bounded[("hipchat_poller_store_connections_omitted", ())] == 1
    assert not any(name.startswith("hipchat_poller_budget_used") for name, _ in bounded)
    late = samples(read_store(p.rt, datetime.now(UTC), limit=10, deadline=time.monotonic() - 1))
    assert late[("hipchat_poller_store_connections_omitted", ())] == 1  # its budget, unread
    assert late[("hipchat_poller_connection_failing_rooms", (("connection", conn),))] == 1
    assert not any(name.startswith("hipchat_poller_budget_used") for name, _ in late)


def test_a_store_that_cannot_be_read_is_down_not_an_error(tmp_path: Path) -> None:
    rt = Runtime(
        Settings(
            data_dir=str(tmp_path),
            database_url=f"sqlite:///{tmp_path}/no/such/dir/db.sqlite",
            redis_url="redis://127.0.0.1:1/0",
        )
    )
    found = samples(read_store(rt, datetime.now(UTC), limit=10, deadline=time.monotonic() + 5))
    assert found[("hipchat_poller_store_up", (("store", "database"),))] == 0
    assert not any(name == "hipchat_poller_connections" for name, _ in found)
    rt.close()


# -- multiprocess mode, in subprocesses --------------------------------------------------------
RECORDER = """
import os, sys
import prometheus_client  # as Flower does, imported by Celery's command line before us
from tasks.settings import Settings
from worker.metrics_process import start_recording, _child_exited
group = start_recording(Settings(data_dir=sys.argv[1]), "worker")
from tasks import metrics

class Result:
    skipped = None; failing = {}; waiting = []; problems = []; done = ["history:1"]

with metrics.PollTimer(Result()):
    metrics.http_call("hipchat", 200, 0.02)
metrics.delivery_finished("webhook", 0.01)
metrics.polls_sent(2)
for exits in ("cleanly", "killed"):
    child = os.fork()
    if child == 0:
        metrics.http_call("hipchat", 200, 0.02)
        metrics.polls().in_progress.inc()  # a poll running when the child ends
        if exits == "cleanly":
            _child_exited(pid=os.getpid())
        os._exit(0)
    os.waitpid(child, 0)
print(group, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-c", RECORDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    group = Path(proc.stdout.readline().strip())
    try:
        yield proc, group
    finally:
        if proc.poll() is None:
            proc.communicate("", timeout=30)


def merged(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }


def test_each_process_group_is_merged_under_its_own_label(
    recorder: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    proc, group = recorder
    assert group == tmp_path / "metrics" / f"worker-{proc.pid}"
    found = merged(ProcessFiles(tmp_path / "metrics"))
    process = ("process", group.name)
    assert found[("hipchat_poller_polls_total", (("outcome", "ok"), process))] == 1
    # The parent's call and each child's: the children wrote files of their own.
    assert found[("hipchat_poller_hipchat_calls_total", (process, ("status", "200")))] == 3
    assert found[("hipchat_poller_hipchat_call_duration_seconds_count", (process,))] == 3
    # Neither child's running poll counts: one marked itself dead, the other is gone.
    assert found[("hipchat_poller_polls_in_progress", (process,))] == 0
    assert merged(ProcessFiles(tmp_path / "metrics", group)) == found


def test_a_new_process_removes_the_groups_of_processes_that_are_gone(
    recorder: tuple[subprocess.Popen[str], Path], tmp_path: Path
) -> None:
    proc, group = recorder
    proc.communicate("", timeout=30)
    assert merged(ProcessFiles(tmp_path / "metrics")) == {}  # gone: not served
    assert group.exists()
    code = (
        "import os, sys; from tasks.settings import Settings; "
        "from worker.metrics_process import groups, start_recording; "
        "mine = start_recording(Settings(data_dir=sys.argv[1]), 'beat'); "
        "assert os.environ['PROMETHEUS_MULTIPROC_DIR'] == str(mine); "
        "print([g.name for g in groups(mine.parent)] == [mine.name])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout == "True\n"
    assert not group.exists()


# -- serving ---------------------------------------------------------------------------------------
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"


def dashboard_metrics() -> set[str]:
    """The metric names in the expressions of every panel of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 15
    return {name for expr in exprs for name in re.findall(r"\bhipchat_poller_\w+", expr)}


@SQLITE
def test_the_server_serves_what_the_dashboard_reads(
    pipeline: Pipeline, recorder: tuple[subprocess.Popen[str], Path]
) -> None:
    """One scrape over HTTP: a recording process's files (every family) and the stores'
    figures; every metric the dashboard's expressions name is in it, no token is."""
    p = pipeline
    p.subscribe("room_message")
    p.poll()
    root = Path(p.rt.settings.effective_metrics_dir)
    assert recorder[1].parent == root
    collectors = [ProcessFiles(root), StoreCollector(p.rt, limit=10)]
    server = MetricsServer.bind("127.0.0.1", 0, collectors).start()
    try:
        with urllib.request.urlopen(server.url, timeout=10) as answer:
            text = answer.read().decode()
    finally:
        server.stop()
    found = set()
    for family in text_string_to_metric_families(text):
        found |= {family.name, *(s.name for s in family.samples)}
    assert dashboard_metrics() - found == set()
    assert p.token not in text


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["worker", "--metrics-port", "http"],
         "error: argument --metrics-port: a port is a number within 0..65535, not 'http'\n"),
        (["beat", "--metrics-port=70000"],
         "error: argument --metrics-port: a port is a number within 0..65535, not '70000'\n"),
        (["worker", "--metrics-port"], "error: argument --metrics-port: expected one argument\n"),
        (["run", "--metrics-port", "-5"],
         "error: argument --metrics-port: a port is a number within 0..65535, not '-5' "
         "(see `hipchat-poller run --help`)\n"),
    ],
)  # fmt: skip
def test_worker_beat_and_run_refuse_a_bad_metrics_port(
    cli: Cli, argv: list[str], error: str
) -> None:
    assert cli(*argv) == (2, "", error)


def test_a_worker_refuses_a_busy_metrics_port(
    tmp_path: Path, real_redis: Any, key_prefix: str
) -> None:
    """In a subprocess: the worker chooses multiprocess mode before it binds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPCHAT_POLLER_")} | {
        "HIPCHAT_POLLER_REDIS_URL": REDIS_URL,
        "HIPCHAT_POLLER_REDIS_KEY_PREFIX": key_prefix,
        "HIPCHAT_POLLER_DATA_DIR": str(tmp_path),
        "HIPCHAT_POLLER_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
    }
    exe = str(Path(sys.executable).parent / "hipchat-poller")
    subprocess.run([exe, "migrate"], env=env, check=True, capture_output=True, timeout=60)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [exe, "worker", "--metrics-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
