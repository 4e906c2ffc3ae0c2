"""Flower, run as the compose file runs it, watches real workers and never shows a secret.

Real processes against a ``redis-server`` and a PostgreSQL database of this test's own, and
the emulator in this process:

* ``hipchat-poller worker`` (one, concurrency 2) and ``hipchat-poller beat``;
* Flower: ``celery -A worker.celery_app:app flower --port=P --address=127.0.0.1`` with the
  same ``HIPCHAT_POLLER_*`` settings and ``FLOWER_UNAUTHENTICATED_API=true`` (Flower 2.x
  answers its HTTP API only with that, or with an auth option);
* configured through the CLI: a connection whose personal access token is a distinctive
  string, a webhook subscription with a distinctive secret and a ``--reply`` subscription.

The test waits (conditions, never sleeps) until Flower's HTTP API shows the worker online,
``hipchat.poll_connection`` and ``hipchat.deliver`` tasks that succeeded, and a
``hipchat.action.post_message`` sent with ``app.send_task`` from this process that succeeded
with its result (and one to a room that does not exist, which failed: Flower shows its
exception and traceback). Then no token, webhook secret or Fernet key may appear in anything
Flower answered (workers with their ``conf`` and ``stats``, the task list with args, kwargs
and results, every task's info and page, the metrics) nor in Flower's log. Every answer kept
for that hunt is also written to ``<tmp>/flower-api.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from celery import Celery
from cryptography.fernet import Fernet

from emulator import EmulatorServer
from tests.e2e_support import Service, WebhookReceiver, tail
from tests.redis_server import RedisServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HIPCHAT_POLLER = str(BIN / "hipchat-poller")
CELERY = str(BIN / "celery")

INTERVAL = 2.0  # HIPCHAT_POLLER_POLL_INTERVAL_SECONDS
START_TIMEOUT = 60.0  # a Celery worker or Flower starting on a loaded 2-core machine
TIMEOUT = 45.0  # anything that needs a few polls

POLL_TASK = "hipchat.poll_connection"
DELIVER_TASK = "hipchat.deliver"
ACTION_TASK = "hipchat.action.post_message"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FlowerApi:
    """GETs against Flower, each answer kept (as bytes) for the secrets hunt."""

    base_url: str
    log_path: Path  # every kept answer, to read after a failure
    session: requests.Session = field(default_factory=requests.Session)
    fetched: list[tuple[str, bytes]] = field(default_factory=list)

    def get(self, path: str, *, keep: bool = True, **params: Any) -> requests.Response:
        response = self.session.get(self.base_url + path, params=params, timeout=30)
        if keep:
            self.fetched.append((response.url, response.content))
            with self.log_path.open("ab") as log:
                log.write(f"GET {response.url} -> {response.status_code}\n".encode())
                log.write(response.content + b"\n\n")
        return response

    def json(self, path: str, *, keep: bool = True, **params: Any) -> Any:
        response = self.get(path, keep=keep, **params)
        assert response.status_code == 200, f"GET {response.url}: {response.status_code}"
        return response.json()

    def healthy(self) -> bool:
        try:
            return self.get("/healthcheck", keep=False).status_code == 200
        except requests.RequestException:
            return False

    def tasks(self, name: str | None = None, *, keep: bool = False) -> dict[str, dict[str, Any]]:
        params = {"taskname": name} if name else {}
        found: dict[str, dict[str, Any]] = self.json("/api/tasks", keep=keep, **params)
        return found


@dataclass
class Stack:
    tmp: Path
    env: dict[str, str]
    srv: EmulatorServer
    receiver: WebhookReceiver
    key_prefix: str
    run_id: str
    fernet_key: str
    services: list[Service] = field(default_factory=list)
    cli_output: list[str] = field(default_factory=list)
    flower: Service | None = None
    api: FlowerApi | None = None

    def cli(self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [HIPCHAT_POLLER, *args],
            input=stdin,
            env=self.env | (env or {}),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.cli_output.append(f"$ hipchat-poller {' '.join(args)}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, (
            f"hipchat-poller {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
        return done.stdout

    def service(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, argv, env or self.env, self.tmp, self.tmp / f"{name}.log")
        self.services.append(service)
        return service.start()

    def start_flower(self) -> FlowerApi:
        """Flower on a free port; a port taken between the choice and the bind is retried."""
        env = self.env | {"FLOWER_UNAUTHENTICATED_API": "true"}
        for attempt in range(3):
            port = free_port()
            argv = [CELERY, "-A", "worker.celery_app:app", "flower"]
            argv += [f"--port={port}", "--address=127.0.0.1"]
            flower = self.service(f"flower-{attempt}" if attempt else "flower", argv, env)
            api = FlowerApi(f"http://127.0.0.1:{port}", self.tmp / "flower-api.log")
            wait_for(
                lambda: api.healthy() or not flower.alive(),  # noqa: B023
                START_TIMEOUT,
                "Flower to answer /healthcheck",
                describe=lambda: tail(flower.log_text()),  # noqa: B023
            )
            if flower.alive():
                self.flower, self.api = flower, api
                return api
            api.session.close()
            flower.stop()
            if "Address already in use" not in flower.log_text():
                break
        raise AssertionError(f"Flower did not start:\n{tail(flower.log_text())}")

    def describe(self) -> str:
        return "\n".join(f"--- {s.name} ---\n{tail(s.log_text(), 25)}" for s in self.services)

    def close(self) -> None:
        for service in self.services:
            service.terminate()
        for service in self.services:
            service.stop()
        if self.api is not None:
            self.api.session.close()


@pytest.fixture
def stack(tmp_path: Path, fresh_postgres: str, redis_server: RedisServer) -> Iterator[Stack]:
    run_id = uuid.uuid4().hex[:8]
    key_prefix = f"hp-flower-{run_id}"
    with contextlib.ExitStack() as cleanup:
        srv = EmulatorServer(
            port=0,
            admin_token=f"flower-admin-{secrets.token_hex(8)}",
            rate_limit=1_000_000,
            flood_limit=10_000,
        ).start()
        cleanup.callback(srv.stop)
        receiver = WebhookReceiver().start()
        cleanup.callback(receiver.stop)
        fernet_key = Fernet.generate_key().decode()
        ours = ("HIPCHAT_POLLER_", "FLOWER_")  # only the settings below reach the processes
        env = {k: v for k, v in os.environ.items() if not k.startswith(ours)} | {
            "HIPCHAT_POLLER_REDIS_URL": redis_server.url,
            "HIPCHAT_POLLER_REDIS_KEY_PREFIX": key_prefix,
            "HIPCHAT_POLLER_DATABASE_URL": fresh_postgres,
            "HIPCHAT_POLLER_SECRET_KEY": fernet_key,
            "HIPCHAT_POLLER_POLL_INTERVAL_SECONDS": str(INTERVAL),
            "HIPCHAT_POLLER_RELAY_INTERVAL_SECONDS": str(INTERVAL),
            "HIPCHAT_POLLER_DATA_DIR": str(tmp_path / "data"),
            "PYTHONUNBUFFERED": "1",
        }
        stack = Stack(tmp_path, env, srv, receiver, key_prefix, run_id, fernet_key)
        cleanup.callback(stack.close)  # runs first: every process ends before the rest
        yield stack


def _connection_id(app: Celery, name: str) -> int:
    from storage import connections as conns
    from tasks.runtime import Runtime

    with Runtime.of(app).db.session() as s:
        row = conns.get_connection(s, name)
        assert row is not None, f"no connection {name}"
        return int(row.id)


def _subscriptions(app: Celery, conn_id: int) -> list[tuple[int, str, bool]]:
    """(id, target kind, primed) of each subscription of the connection."""
    from storage import subscriptions as subs
    from tasks.runtime import Runtime

    with Runtime.of(app).db.session() as s:
        rows = subs.list_subscriptions(s, conn_id)
        return [(r.id, r.target_kind, r.primed_at is not None) for r in rows]


def _succeeded(
    tasks: dict[str, dict[str, Any]], name: str, match: Callable[[Any], bool]
) -> list[str]:
    return [
        uuid_
        for uuid_, task in tasks.items()
        if task.get("name") == name and task.get("state") == "SUCCESS" and match(task)
    ]


def healthcheck(
    stack: Stack, service: str, *, hostname: str = "", heartbeat: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a service's healthcheck from docker-compose.yml here: ``worker@$$HOSTNAME`` is
    ``hostname``, ``/tmp/beat.alive`` is ``heartbeat``, ``celery`` is this venv's."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kind, *test = compose["services"][service]["healthcheck"]["test"]
    if kind == "CMD-SHELL":
        (line,) = test
        test = shlex.split(line.replace("worker@$$HOSTNAME", hostname))
    argv = [str(a).replace("/tmp/beat.alive", str(heartbeat)) for a in test]
    argv[0] = {"celery": CELERY, "python": sys.executable}.get(argv[0], argv[0])
    return subprocess.run(
        argv, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_flower_shows_polls_deliveries_and_actions_but_never_a_secret(stack: Stack) -> None:
    from tasks.runtime import Runtime
    from tasks.settings import Settings
    from worker.app import create_app

    token = f"flower-pat-{secrets.token_hex(16)}"
    hook_secret = f"flower-hook-secret-{secrets.token_urlsafe(18)}"
    hidden = {
        "the personal access token": token,
        "the webhook secret": hook_secret,
        "the Fernet key": stack.fernet_key,
    }
    stack.srv.state.create_token(1, token=token)
    alice = int(stack.srv.state.create_user("Alice Flower", mention_name="aliceflower")["id"])
    room = stack.srv.state.create_room(f"Flower {stack.run_id}")

    stack.cli("migrate")
    flower_api = stack.start_flower()
    worker_name = f"flower-w-{stack.run_id}"
    worker_options = ["--concurrency", "2", "--loglevel", "INFO"]
    stack.service("worker", [HIPCHAT_POLLER, "worker", "-n", f"{worker_name}@%h", *worker_options])
    heartbeat = stack.tmp / "beat.alive"
    stack.service(
        "beat",
        [HIPCHAT_POLLER, "beat", "--loglevel", "INFO"],
        env=stack.env | {"HIPCHAT_POLLER_BEAT_HEARTBEAT_FILE": str(heartbeat)},
    )

    # Configured as an operator does, while the processes start.
    conn_name = f"ops-{stack.run_id}"
    out = stack.cli(
        "connection",
        "add",
        conn_name,
        "--base-url",
        stack.srv.base_url,
        "--token-stdin",
        stdin=token + "\n",
    )
    assert token not in out
    stack.receiver.secret_for("/hook", hook_secret)
    stack.cli(
        "subscribe",
        conn_name,
        "--event",
        "room_message",
        "--room",
        room["name"],
        "--webhook",
        stack.receiver.url("/hook"),
        env={"HIPCHAT_POLLER_WEBHOOK_SECRET": hook_secret},
    )
    stack.cli(
        "subscribe",
        conn_name,
        "--event",
        "room_message",
        "--room",
        room["name"],
        "--filter",
        "^ping (.*)",
        "--reply",
        "pong {matches[0]}",
    )

    app = create_app(Settings.from_env(stack.env))  # this process, as a send_task caller
    try:
        conn_id = _connection_id(app, conn_name)

        # 1. The worker, online in Flower (its heartbeats) and answering Flower's inspection.
        def online() -> bool:
            status = flower_api.json("/api/workers", keep=False, status=1)
            return any(n.startswith(worker_name + "@") and up for n, up in status.items())

        wait_for(online, START_TIMEOUT, "Flower to show the worker online", describe=stack.describe)
        (hostname,) = [
            n for n in flower_api.json("/api/workers", status=1) if n.startswith(worker_name + "@")
        ]

        def inspected() -> dict[str, Any] | None:
            workers = flower_api.json("/api/workers", keep=False, refresh=1)
            info = workers.get(hostname) or {}
            return workers if {"stats", "conf", "registered"} <= set(info) else None

        workers = wait_for(inspected, START_TIMEOUT, "Flower's inspection of the worker")
        assert ACTION_TASK in workers[hostname]["registered"]

        # The compose healthchecks, run as compose runs them: the worker's ping to its own
        # node name answers (and one to a node that is not there fails); beat's heartbeat.
        assert healthcheck(stack, "worker", hostname=hostname).returncode == 0
        assert healthcheck(stack, "worker", hostname="nobody@nowhere").returncode != 0
        wait_for(heartbeat.exists, START_TIMEOUT, "beat's heartbeat file")
        assert healthcheck(stack, "beat", heartbeat=heartbeat).returncode == 0

        # 2. Primed, then the room speaks: the reply answers the ping, the webhook gets all.
        wait_for(
            lambda: (subs := _subscriptions(app, conn_id)) and all(p for _, _, p in subs),
            TIMEOUT,
            "both subscriptions to be primed",
            describe=stack.describe,
        )
        sub_ids = {kind: sub_id for sub_id, kind, _ in _subscriptions(app, conn_id)}
        assert set(sub_ids) == {"webhook", "action"}, sub_ids
        stack.srv.state.post_message(room["id"], alice, "ping flower")
        stack.srv.state.post_message(room["id"], alice, "hello flower")

        # 3. An action task sent by name, as a send_task caller does; its result comes back.
        text = f"sent by send_task {stack.run_id}"
        sent = app.send_task(ACTION_TASK, args=[conn_name, room["name"], text])
        result = sent.get(timeout=TIMEOUT)
        posted = [m for m in stack.srv.state.history(room["id"]) if m["message"] == text]
        assert [m["id"] for m in posted] == [result["id"]], (result, posted)
        # And one that fails (no such room): Flower then shows its exception and traceback,
        # which the hunt covers too.
        failed = app.send_task(ACTION_TASK, args=[conn_name, f"Nowhere {stack.run_id}", "lost"])
        failed.get(timeout=TIMEOUT, propagate=False)
        assert failed.state == "FAILURE", (failed.state, failed.result)

        wait_for(
            lambda: any(m["message"] == "pong flower" for m in stack.srv.state.history(room["id"])),
            TIMEOUT,
            "the reply 'pong flower' in the room",
            describe=stack.describe,
        )
        # The webhook gets what people said; what the connection posted itself (the pong, the
        # send_task message) fires no subscription: no reply loops.
        history = f"/v2/room/{room['id']}/history"
        polls_after = len(stack.srv.state.calls(path_prefix=history)) + 2
        wait_for(
            lambda: len(stack.srv.state.calls(path_prefix=history)) >= polls_after,
            TIMEOUT,
            "two more polls of the room after the pong",
            describe=stack.describe,
        )
        wait_for(
            lambda: (
                {"ping flower", "hello flower"}
                <= {d.json["message"] for d in stack.receiver.deliveries("/hook")}
            ),
            TIMEOUT,
            "the two messages at the webhook",
            describe=stack.describe,
        )
        delivered = [d.json["message"] for d in stack.receiver.deliveries("/hook")]
        assert sorted(delivered) == ["hello flower", "ping flower"]
        assert all(d.signature_ok for d in stack.receiver.deliveries("/hook"))

        # 4. What Flower shows of all that.
        def polls(tasks: dict[str, dict[str, Any]]) -> list[str]:
            return _succeeded(
                tasks,
                POLL_TASK,
                lambda t: (
                    str(t.get("args", "")).startswith(f"[{conn_id},")
                    and re.search(r"ok: [1-9]\d* events", str(t.get("result"))) is not None
                ),
            )

        def deliveries(tasks: dict[str, dict[str, Any]], sub_id: int) -> list[str]:
            return _succeeded(
                tasks,
                DELIVER_TASK,
                lambda t: (
                    t.get("args") == f"[{sub_id}]"
                    and re.search(r"delivered [1-9]", str(t.get("result"))) is not None
                ),
            )

        def flower_saw_it_all() -> dict[str, dict[str, Any]] | None:
            tasks = flower_api.tasks()
            action = tasks.get(sent.id, {})
            done = (
                polls(tasks)
                and all(deliveries(tasks, sub_id) for sub_id in sub_ids.values())
                and action.get("state") == "SUCCESS"
                and tasks.get(failed.id, {}).get("state") == "FAILURE"
            )
            return tasks if done else None

        def flower_state() -> str:
            tasks = flower_api.tasks()
            return json.dumps(
                {
                    k: {f: t.get(f) for f in ("name", "args", "state", "result")}
                    for k, t in tasks.items()
                },
                indent=1,
            )[-6000:]

        wait_for(
            flower_saw_it_all,
            TIMEOUT,
            "Flower to show succeeded polls and deliveries, and both actions",
            describe=flower_state,
        )
        tasks = flower_api.tasks(keep=True)  # the list as it is now, kept for the hunt
        action = flower_api.json(f"/api/task/info/{sent.id}")
        assert action["name"] == ACTION_TASK
        assert action["state"] == "SUCCESS"
        assert action["worker"] == hostname
        assert action["sent"], "no task-sent event from the send_task caller reached Flower"
        assert result["id"] in action["result"], action
        assert text in action["args"], action
        assert conn_name in action["args"], action
        failure = flower_api.json(f"/api/task/info/{failed.id}")
        assert failure["state"] == "FAILURE", failure
        assert "Nowhere" in failure["exception"], failure
        assert "Traceback" in failure["traceback"], failure
        for task_id, task in tasks.items():
            info = flower_api.json(f"/api/task/info/{task_id}")
            assert info["name"] == task["name"]
            if info["state"] == "SUCCESS":  # a poll beat just sent has no worker yet
                assert info["worker"] == hostname, info
        assert {POLL_TASK, DELIVER_TASK, ACTION_TASK} <= set(
            flower_api.json("/api/task/types")["task-types"]
        )
        backend = flower_api.json(f"/api/task/result/{sent.id}")
        assert backend["state"] == "SUCCESS"
        assert backend["result"] == result

        # Everything else Flower shows of this cluster, for the hunt.
        flower_api.json("/api/workers")
        flower_api.json("/api/workers", refresh=1)
        full = flower_api.json("/api/workers", workername=hostname, refresh=1)
        assert "conf" in full[hostname], full
        flower_api.json("/api/queues/length")
        for page in ("/metrics", "/workers", f"/worker/{hostname}", "/tasks"):
            assert flower_api.get(page).status_code == 200, page
        for task_id in tasks:
            assert flower_api.get(f"/task/{task_id}").status_code == 200, task_id
    finally:
        Runtime.of(app).close()
        app.close()

    # 5. Flower stops cleanly on SIGTERM; then its whole log is there to read.
    flower = stack.flower
    assert flower is not None
    assert flower.stop() == 0, tail(flower.log_text())
    log = flower.log_text()
    assert flower_api.base_url.removeprefix("http://") in log  # its banner: the right log
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 2000) :][:6000]
    # The hunt covered what matters: task arguments and results, workers' configuration.
    everything = b"\n".join(body for _, body in flower_api.fetched)
    for shown in (text, conn_name, '"conf"', "broker_url", '"stats"'):
        assert shown.encode() in everything, f"{shown} is in no answer of Flower"
    haystacks = [*flower_api.fetched, ("Flower's log", log.encode())]
    leaks = [
        f"{what} ({secret[:12]}...) is in {where}"
        for what, secret in hidden.items()
        for where, body in haystacks
        if secret.encode() in body
    ]
    assert not leaks, f"{leaks} (every answer is in {flower_api.log_path})"
    for service in stack.services:
        if service.returncode is None:  # not stopped on purpose
            assert service.alive(), f"{service.name} died:\n{tail(service.log_text())}"
