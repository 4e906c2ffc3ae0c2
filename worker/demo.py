"""``hipchat-poller demo``: the whole product in one process, against the emulator.

The emulator, the worker and beat run in this process on embedded defaults (SQLite in a
temporary directory, in-process broker and token bucket) with a short poll interval. A
simulated user says ``ping hello`` in room Factor and the worker answers ``pong hello`` in
green, as in Factor's recipe; a file upload, a topic change, a user entering and a new room
each show up as an event. Every delivered event is printed as it happens with what the
worker did about it, then a summary; the exit status is 0 only if everything arrived.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SecurityWarning
from cryptography.fernet import Fernet

from emulator import EmulatorServer
from storage import outbox
from storage import subscriptions as subs
from tasks.connections_api import add_connection
from tasks.runtime import Runtime
from tasks.settings import Settings
from tasks.subscribe import SubscriptionSpec
from tasks.subscriptions_api import create_subscriptions
from worker.app import create_app
from worker.embedded import EmbeddedWorker

ROOM = "Factor"
DEMO_TOKEN = "demo-admin-token"  # noqa: S105 (the emulator's throwaway admin token)
EXPECTED = (
    "room_message",
    "room_file_upload",
    "room_topic_change",
    "room_enter",
    "room_created",
    "room_notification",
)


@dataclass
class Seen:
    printed: set[int] = field(default_factory=set)
    events: Counter[str] = field(default_factory=Counter)


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def describe(row: Any) -> str:
    event = row.payload
    item = event.get("item") or {}
    message = item.get("message") or {}
    sender = message.get("from") or item.get("sender") or {}
    who = sender.get("name") if isinstance(sender, dict) else sender
    if row.event in ("room_message", "room_notification"):
        what = f'{who or "?"}: "{message.get("message", "")}"'
    elif row.event == "room_file_upload":
        what = f"{who} uploaded {(message.get('file') or {}).get('name')}"
    elif row.event == "room_topic_change":
        what = f'{who} set the topic to "{item.get("topic")}"'
    elif row.event in ("room_enter", "room_exit"):
        what = f"{who} {'entered' if row.event == 'room_enter' else 'left'}"
    else:
        what = f"room {(item.get('room') or {}).get('name')!r}"
    return f"[{row.event}] {what}  ->  {row.outcome or row.state}"


def subscriptions() -> list[SubscriptionSpec]:
    def spec(event: str, kind: str, target: dict[str, Any], **kw: Any) -> SubscriptionSpec:
        return SubscriptionSpec(
            connection="demo", event=event, target_kind=kind, target=target, **kw
        )

    return [
        spec(
            "room_message",
            "action",
            {
                "action": "send_notification",
                "message": "pong {matches[0]}",
                "color": "green",
                "format": "text",
                "from": "pong-bot",
            },
            room=ROOM,
            filter=r"^ping (.*)",
            name="ping-pong",
        ),
        spec("room_file_upload", "log", {}, room=ROOM),
        spec("room_topic_change", "log", {}, room=ROOM),
        spec("room_enter", "log", {}, room=ROOM),
        # The pong is the connection's own notification: shown only because this one asks
        # for the connection's own posts (a reply subscription never sees its own replies).
        spec("room_notification", "log", {}, room=ROOM, include_own=True),
        spec("room_created", "log", {}),
    ]


def run_demo(
    *, interval: float = 2.0, timeout: float = 60.0, out: Callable[[str], None] = print
) -> int:
    # The demo often runs as root in a container; the advice is for production workers.
    warnings.filterwarnings("ignore", category=SecurityWarning)

    with tempfile.TemporaryDirectory(prefix="hipchat-poller-demo-") as data_dir:
        settings = Settings(
            data_dir=data_dir,
            secret_key=Fernet.generate_key().decode(),
            poll_interval_seconds=interval,
            relay_interval_seconds=interval,
            relay_min_age_seconds=interval * 3,
        )
        server = EmulatorServer(port=0, admin_token=DEMO_TOKEN)
        server.start()
        app = create_app(settings)
        rt = Runtime.of(app)
        worker = EmbeddedWorker(app, concurrency=4, quiet=True)
        try:
            return _scenario(rt, server, worker, interval, timeout, out)
        finally:
            worker.stop()
            server.stop()


def _scenario(
    rt: Runtime,
    server: EmulatorServer,
    worker: EmbeddedWorker,
    interval: float,
    timeout: float,
    out: Callable[[str], None],
) -> int:
    state = server.state
    rt.db.upgrade()
    alice = state.create_user("Alice Anders", mention_name="alice", email="alice@example.com")
    bob = state.create_user("Bob Brown", mention_name="bob", email="bob@example.com")
    state.create_room(ROOM, topic="Factor recipes")
    add_connection(rt, "demo", server.base_url, DEMO_TOKEN)
    create_subscriptions(rt, subscriptions())
    out(
        f"emulator at {server.base_url}; worker and beat polling every {interval:g}s "
        f"(embedded: SQLite, in-process broker and token bucket)"
    )
    worker.start()
    out("first poll primes every subscription (it fires nothing) ...")
    if not wait_for(lambda: _all_primed(rt), timeout):
        out("the first poll did not happen in time")
        return 1
    out("Alice says 'ping hello'; uploads a file; sets the topic; Bob enters; a room is created")
    state.post_message(ROOM, alice["id"], "ping hello")
    state.upload_file(ROOM, alice["id"], "report.pdf", b"%PDF-1.4 demo", message="Q3 report")
    state.set_topic(ROOM, alice["id"], "Recipes and pongs")
    state.enter_room(ROOM, bob["id"])
    state.create_room("Launch")
    seen = Seen()
    done = wait_for(
        lambda: _print_new(rt, seen, out) and all(seen.events[e] for e in EXPECTED), timeout
    )
    pongs = [
        m
        for m in state.history(ROOM)
        if m.get("type") == "notification"
        and m.get("message") == "pong hello"
        and m.get("color") == "green"
    ]
    calls = len(state.calls(token=DEMO_TOKEN))
    out("")
    out("summary: " + ", ".join(f"{e} x{seen.events[e]}" for e in EXPECTED))
    out(f"pong hello answered in green: {len(pongs)} time(s); HipChat calls used: {calls}")
    ok = done and len(pongs) == 1
    out("demo OK" if ok else "demo FAILED: some events did not arrive in time")
    return 0 if ok else 1


def _all_primed(rt: Runtime) -> bool:
    with rt.db.session() as s:
        rows = subs.list_subscriptions(s)
        return bool(rows) and all(r.primed_at is not None for r in rows)


def _print_new(rt: Runtime, seen: Seen, out: Callable[[str], None]) -> bool:
    with rt.db.session() as s:
        for row in outbox.delivered_since(s, after_id=0, limit=10_000):
            if row.id not in seen.printed:
                seen.printed.add(row.id)
                seen.events[row.event] += 1
                out(describe(row))
    return True
