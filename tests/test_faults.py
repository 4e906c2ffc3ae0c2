"""The fault suite: real processes, real faults, and what each fault costs (docs/reliability.md).

Two ``hipchat-poller worker`` processes and ``hipchat-poller beat`` run against a Redis with
AOF, a PostgreSQL cluster of this module's own, the emulator over HTTP and a webhook receiver
(``tests/fault_stack.py``). Each scenario breaks one thing and asserts:

* **0 lost**: every message said becomes its event / reply / post;
* **0 doubled**: no HipChat message posted twice, no webhook idempotency key accepted twice;
* **the ceiling held**: on the emulator's arrival stamps, the connection's calls in any
  ``BUCKET_WINDOW_SECONDS`` never exceed ``BUCKET_CAPACITY`` (no allowance for jitter: the
  budget's margin is there for it);
* **the recovery time**: measured, printed (the table at the end of the module) and bounded.

The scenarios run in file order on one set of processes; each pauses its connection when it
is done, so the next one runs on idle workers.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fault_receiver import ABANDONED
from tests.fault_stack import (
    CAPACITY,
    INTERVAL,
    RECOVERY_TIMEOUT,
    TIMEOUT,
    VISIBILITY_TIMEOUT,
    WINDOW,
    Conn,
    FaultStack,
    Figures,
    Room,
    delivered,
    doubled,
    keys_doubled,
    most_calls,
    received,
    watched,
)
from tests.pg_server import PostgresServer
from tests.redis_server import RedisServer
from tests.waiting import wait_for
from worker.app import RESTORE_INTERVAL_SECONDS

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """PostgreSQL of this module's own: scenario 5 stops it (never the machine's)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The broker and the budget, with the persistence production needs (AOF)."""
    with RedisServer(tmp_path_factory.mktemp("redis-aof"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    pg: PostgresServer,
    redis_aof: RedisServer,
    request: pytest.FixtureRequest,
) -> Iterator[FaultStack]:
    tmp = tmp_path_factory.mktemp("faults")
    stack = FaultStack(tmp, redis_aof, pg, pg.create_database("faults"))
    try:
        stack.start()
        yield stack
    finally:
        stack.close()
        table = "\n".join(f.row() for f in stack.figures)
        (tmp / "reliability-figures.md").write_text(table + "\n")
        show(request.config, f"\nfault suite figures (docs/reliability.md):\n{table}")


def show(config: pytest.Config, text: str) -> None:
    """Print past pytest's output capture (the figures are the point of the run)."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text, flush=True)


# -- 9. A reply subscription without a filter ---------------------------------------------------
def test_a_reply_without_filter_answers_one_message_once_ever(stack: FaultStack) -> None:
    s = watched(stack, "s9", "action", action="post_message", message="echo {message}")
    stack.wait_primed(s.conn)
    said = s.say("hello loop")
    wait_for(
        lambda: "echo hello loop" in stack.texts(s.room),
        TIMEOUT,
        "the reply",
        describe=stack.describe,
    )
    (post,) = s.conn.calls(f"/v2/room/{s.room['id']}/message")
    polls = len(s.history_calls())
    wait_for(
        lambda: len(s.history_calls()) >= polls + 5,
        TIMEOUT,
        "five more polls of the room",
        describe=stack.describe,
    )
    stack.quiet(s.conn)
    texts = stack.texts(s.room)
    assert texts == ["hello loop", "echo hello loop"], texts
    assert len(s.conn.calls(f"/v2/room/{s.room['id']}/message")) == 1
    events = stack.outbox(s.conn)
    assert [(e.payload["message"], e.state) for e in events] == [("hello loop", "delivered")]
    most = most_calls(s.conn.call_times())
    stack.record(
        Figures(
            "9. `--reply` without a filter, 5 more polls",
            lost=0,
            doubled=doubled(texts),
            most_calls=most,
            recovery=f"reply {post.time - said:.1f} s after the message; no second reply",
        )
    )
    assert most <= CAPACITY
    assert post.time - said <= INTERVAL + 5


# -- 6. One room answering 500 ------------------------------------------------------------------
def test_one_room_failing_holds_back_no_other_room(stack: FaultStack) -> None:
    conn = stack.add_connection("s6")
    user = stack.user("s6")
    rooms = {name: stack.room(f"s6 {name}") for name in ("failing", "b", "c")}
    target = stack.webhook("/s6")
    for room in rooms.values():
        stack.subscribe(conn, room, "webhook", target)
    stack.wait_primed(conn)
    failing = rooms["failing"]
    history = f"/v2/room/{failing['id']}/history"
    stack.srv.state.inject_fault("status", status=500, count=100_000, path_prefix=history)
    wait_for(
        lambda: any(c.status == 500 for c in conn.calls(history)),
        TIMEOUT,
        "a 500 from the failing room",
    )
    stack.srv.state.post_message(failing["id"], user, "failing 1")
    said: dict[str, float] = {}
    for i in range(4):
        name = "b" if i % 2 == 0 else "c"
        text = f"{name} {i}"
        stack.srv.state.post_message(rooms[name]["id"], user, text)
        said[text] = time.time()
        wait_for(lambda t=text: t in received(stack, "/s6"), TIMEOUT, f"{text!r} delivered")
    code, report, _ = stack.status()
    cleared = time.time()
    stack.srv.state.clear_faults()
    wait_for(
        lambda: "failing 1" in received(stack, "/s6"),
        TIMEOUT,
        "the failing room's message, after the fault cleared",
        describe=stack.describe,
    )
    recovered = received(stack, "/s6")["failing 1"] - cleared
    stack.quiet(conn)

    got = received(stack, "/s6")
    late = {t: got[t] - said[t] for t in said}
    assert code == 1, report
    assert report is not None
    (mine,) = [c for c in report["connections"] if c["id"] == conn.id]
    (room_status,) = mine["failing_rooms"]
    assert room_status["room_id"] == failing["id"]
    assert "500" in room_status["error"]
    assert room_status["since"] is not None
    most = most_calls(conn.call_times())
    stack.record(
        Figures(
            "6. one room answering 500",
            lost=len((set(said) | {"failing 1"}) - set(got)),
            doubled=keys_doubled(stack, "/s6"),
            most_calls=most,
            recovery=f"other rooms' events {max(late.values()):.1f} s after each message "
            f"(at most); the room's own {recovered:.1f} s after the fault cleared",
        )
    )
    assert max(late.values()) <= INTERVAL + 4, late
    assert recovered <= 30
    assert keys_doubled(stack, "/s6") == 0
    assert most <= CAPACITY


# -- 7. 429s, with the reset as an epoch and as seconds -------------------------------------------
@dataclass
class Refusal:
    form: str
    at: float  # the 429's arrival at HipChat
    reset: float  # the reset it stated, as an epoch
    before: Any  # the last answer before it (its X-Ratelimit-Reset: what HipChat said then)


def first_429(conn: Conn, path: str, form: str, since: float) -> Refusal:
    """The first 429 on ``path`` after ``since``, and the reset it stated."""
    refused = wait_for(
        lambda: [c for c in conn.calls(path) if c.status == 429 and c.time > since],
        TIMEOUT,
        f"a 429 on {path}",
    )[0]
    stated = float(refused.ratelimit_reset)
    reset = stated if stated >= 1e9 else refused.time + stated  # "3": seconds from then
    before = [c for c in conn.calls() if c.time < refused.time and c.status < 300][-1]
    return Refusal(form, refused.time, reset, before)


def resumed(conn: Conn, at: float) -> float:
    """When the connection's first call at or after ``at`` arrived."""
    return min(c.time for c in conn.calls() if c.time >= at)


def test_a_429_stops_every_call_of_the_connection_until_the_stated_reset(
    stack: FaultStack,
) -> None:
    """After each 429 no call of the connection reaches HipChat before the reset it stated:
    an epoch (the window's end); ``3`` after 200s that announced a later epoch; ``4`` while
    another process's call is in flight, whose late 201 announces a later reset with calls to
    spare. Actions sent meanwhile go to any worker, wait, and succeed."""
    # HipChat's window is short here (8 s, fixed from the token's first call) so that an
    # epoch reset comes within seconds; the emulator never refuses on its own.
    hipchat = stack.emulator(rate_limit=1_000_000, rate_window_seconds=8.0)
    conn = stack.add_connection("s7", hipchat)
    user = stack.user("s7", hipchat)
    watched_room, quiet_room = (stack.room(f"s7 {i}", hipchat) for i in range(2))
    for room in (watched_room, quiet_room):
        stack.subscribe(conn, room, "log", {})
    stack.wait_primed(conn)
    history = f"/v2/room/{watched_room['id']}/history"
    posts = f"/v2/room/{quiet_room['id']}/message"
    mention = hipchat.state.get_user(user)["mention_name"]

    def send(name: str, *args: Any) -> Any:
        return stack.app.send_task(f"hipchat.action.{name}", args=[conn.id, *args])

    def slow_post() -> None:
        """A post by the Python API of this process (another client of the connection)."""
        from tasks.actions import Actions

        Actions(stack.rt, conn.id).post_message(quiet_room["id"], "in flight slow")

    refusals: list[Refusal] = []
    sent: list[Any] = []
    in_flight = threading.Thread(target=slow_post)
    for form, seconds in (("epoch", None), ("seconds", 3), ("in flight", 4)):
        if seconds is not None:  # a new HipChat window: its 200s announce a reset 8 s ahead
            with hipchat.state.lock:
                hipchat.state.rate.clear()
        since = time.time()
        if form == "in flight":  # a post leaves before the 429 and is answered after it
            hipchat.state.inject_fault("delay", delay_seconds=2.5, path_prefix=posts)
            in_flight.start()
            wait_for(lambda: not hipchat.state.pending_faults(), TIMEOUT, "the post in flight")
        hipchat.state.inject_fault("rate_limit", path_prefix=history)
        if seconds is not None:  # "X-Ratelimit-Reset: 3", as real 429s said "60"
            hipchat.state.inject_fault("reset_quirk", reset_seconds=seconds, path_prefix=history)
        refusal = first_429(conn, history, form, since)
        refusals.append(refusal)
        if form == "in flight":
            # Its late answer first: actions sent now would reserve their calls after the
            # stop, and takers queue behind reservations, which would hide a lifted stop.
            in_flight.join(TIMEOUT)
        sent.append(send("get_user", f"@{mention}"))
        sent += [send("post_message", quiet_room["id"], f"{form} {i}") for i in range(2)]
        for result in sent:
            result.get(timeout=TIMEOUT)  # waiting is not failing: every action succeeds
        wait_for(lambda r=refusal: time.time() > r.reset + INTERVAL, TIMEOUT, "the reset")
    stack.quiet(conn)

    texts = stack.texts(quiet_room, hipchat)
    wanted = [f"{r.form} {i}" for r in refusals for i in range(2)] + ["in flight slow"]
    early = {r.form: [c for c in conn.calls() if r.at < c.time < r.reset] for r in refusals}
    lag = {r.form: resumed(conn, r.reset) - r.reset for r in refusals}
    slow = [c for c in conn.calls(posts) if c.time < refusals[-1].at][-1]
    most = most_calls(conn.call_times())
    stack.record(
        Figures(
            "7. 429s: reset as an epoch; as `3` after 200s saying later; as `4` with a call "
            "in flight",
            lost=len(set(wanted) - set(texts)),
            doubled=doubled(texts),
            most_calls=most,
            recovery="no call before any stated reset; first call after it: "
            + ", ".join(f"{form} +{late:.1f} s" for form, late in lag.items()),
        )
    )
    assert early == {r.form: [] for r in refusals}, early
    assert max(lag.values()) <= INTERVAL + 2, lag
    # The scenarios are what they say: 200s announced a later reset before the "3" ...
    assert float(refusals[1].before.ratelimit_reset) > refusals[1].reset, refusals[1]
    # ... and the slow post was answered (2.5 s after it arrived) after the "4" came.
    assert slow.time + 2.5 > refusals[2].at, (slow, refusals[2])
    assert sorted(texts) == sorted(wanted)
    assert most <= CAPACITY


# -- 8. A burst of actions on a small budget ----------------------------------------------------
RETRY_LINE = re.compile(r"\[([0-9a-f-]{36})\] retry: ")
BURST = 60  # the 150 at 20 per 10 s (75 s), scaled down: 60 at 20 per 4 s (12 s)


def retries(stack: FaultStack, task_ids: set[str]) -> int:
    """Retries of these tasks, from the workers' logs (Celery logs each one at INFO)."""
    found = (RETRY_LINE.search(line) for t in stack.logs().values() for line in t.splitlines())
    return sum(1 for match in found if match and match[1] in task_ids)


def displacement(sent: list[str], posted: list[str]) -> tuple[int, int]:
    """(pairs posted in the opposite order of their sending, the farthest any message
    landed from its place)."""
    rank = {text: i for i, text in enumerate(sent)}
    order = [rank[t] for t in posted if t in rank]
    pairs = sum(1 for i, a in enumerate(order) for b in order[i + 1 :] if a > b)
    return pairs, max((abs(i - r) for i, r in enumerate(order)), default=0)


@dataclass
class Burst:
    texts: list[str]  # as sent, in order
    posted: list[str]  # as the room shows them
    states: list[str]
    took: float  # from the first send to the last post's arrival
    retries: int
    most_calls: int


@pytest.fixture(scope="module")
def burst(stack: FaultStack) -> Burst:
    """``BURST`` posts to one room sent at once with ``send_task``, in order, each waited for."""
    conn = stack.add_connection("s8")
    room = stack.room("s8")
    texts = [f"burst {i:02d}" for i in range(BURST)]
    started = time.time()
    sent = [
        stack.app.send_task("hipchat.action.post_message", args=[conn.id, room["id"], text])
        for text in texts
    ]
    for result in sent:
        result.get(timeout=120, propagate=False)
    posts = conn.calls(f"/v2/room/{room['id']}/message")
    found = Burst(
        texts,
        stack.texts(room),
        [result.state for result in sent],
        max(c.time for c in posts) - started,
        retries(stack, {r.id for r in sent}),
        most_calls(conn.call_times()),
    )
    pairs, farthest = displacement(texts, found.posted)
    allowed = BURST / CAPACITY * WINDOW
    stack.record(
        Figures(
            f"8. {BURST} posts at once, {CAPACITY} calls per {WINDOW:g} s",
            lost=len(set(texts) - set(found.posted)),
            doubled=doubled(found.posted),
            most_calls=found.most_calls,
            recovery=f"all done in {found.took:.1f} s (the budget allows {allowed:g} s); "
            f"{found.retries} retries; order: {pairs} pairs swapped, none more than "
            f"{farthest} places from its own",
        )
    )
    return found


def test_a_burst_of_actions_drains_at_the_budgets_pace(burst: Burst) -> None:
    """Every post succeeds, once, within 1.5x the time the budget allows, with no retry storm
    (a task waits for its reservation once), and the ceiling holds on arrival stamps."""
    assert burst.states == ["SUCCESS"] * BURST, Counter(burst.states)
    assert sorted(burst.posted) == burst.texts
    assert burst.took <= 1.5 * BURST / CAPACITY * WINDOW
    assert burst.retries <= 2 * BURST
    assert burst.most_calls <= CAPACITY


@pytest.mark.xfail(
    strict=True,
    reason="each action is its own task: the 6 pool processes run 6 at once and their posts "
    "reach HipChat in whichever order they get there, and a post that waited for the budget "
    "comes back up to BUCKET_MARGIN_SECONDS/4 after its reservation, at random "
    "(docs/reliability.md, 'What it does not promise')",
)
def test_actions_to_one_room_keep_their_order(burst: Burst) -> None:
    assert burst.posted == burst.texts


# -- 1, 2, 3. SIGKILL of the workers mid-poll, mid-delivery and mid-post --------------------------
KILL_DELAY = 3.0  # seconds between the kill and the restart


@dataclass
class Crash:
    """Every worker killed at once (``killed``) while four things were in flight: a poll of
    ``poll`` inside a slow history call, a delivery of ``delivery`` held by the receiver, a
    ``post_message`` task of ``action`` inside a slow POST, and the reply of ``reply`` inside
    a slow POST. Restarted ``KILL_DELAY`` seconds later."""

    killed: float
    poll: Room
    delivery: Room
    action: Room
    reply: Room
    said: dict[str, list[str]]  # room label -> what was said there before the kill
    task: Any  # the post_message task's AsyncResult
    in_flight: dict[str, bool]  # what was in flight when the workers died


def slow(stack: FaultStack, path: str, seconds: float) -> None:
    """The next call to ``path`` answers ``seconds`` late (HipChat still acts on it)."""
    stack.srv.state.inject_fault("delay", delay_seconds=seconds, path_prefix=path)


def taken(stack: FaultStack, path: str) -> bool:
    return not [f for f in stack.srv.state.pending_faults() if f["path_prefix"] == path]


def arrived_before(conn: Conn, path: str, moment: float, lasting: float) -> bool:
    """A call to ``path`` arrived before ``moment`` and was still being answered then."""
    return any(c.time < moment < c.time + lasting for c in conn.calls(path))


@pytest.fixture(scope="module")
def crash(stack: FaultStack) -> Crash:
    poll = watched(stack, "c1")
    delivery = watched(stack, "c2")
    reply = watched(stack, "c3", "action", action="post_message", message="re: {message}")
    action = Room(stack.add_connection("c3a"), stack.room("c3a"), 0)
    stack.wait_primed(poll.conn, delivery.conn, reply.conn)
    said = {label: [f"{label} {i}" for i in range(3)] for label in ("c1", "c2")}
    said["c3"] = ["c3 hello"]

    # 2. A delivery held by the receiver (its events stay behind it, in order).
    stack.receiver.hold(delivery.path)
    for text in said["c2"]:
        delivery.say(text)
    wait_for(lambda: stack.receiver.holding(delivery.path), TIMEOUT, "the held delivery")
    # 1. A poll inside a slow history call, with three new messages to read.
    history = f"/v2/room/{poll.room['id']}/history"
    slow(stack, history, 15.0)
    for text in said["c1"]:
        poll.say(text)
    wait_for(lambda: taken(stack, history), TIMEOUT, "the slow poll")
    # 3. A post_message task and a reply, each inside a slow POST (HipChat posts it anyway).
    action_post = f"/v2/room/{action.room['id']}/message"
    reply_post = f"/v2/room/{reply.room['id']}/message"
    slow(stack, action_post, 5.0)
    slow(stack, reply_post, 5.0)
    task = stack.app.send_task(
        "hipchat.action.post_message", args=[action.conn.id, action.room["id"], "c3a once"]
    )
    reply.say(said["c3"][0])
    wait_for(
        lambda: taken(stack, action_post) and taken(stack, reply_post),
        TIMEOUT,
        "both slow posts",
        describe=stack.describe,
    )
    killed = stack.kill_workers()
    wait_for(lambda: time.time() >= killed + KILL_DELAY, 2 * KILL_DELAY, "the restart delay")
    stack.restart_workers()
    # Each was in flight: the receiver saw its sender go, HipChat's log (written when a slow
    # call is answered) shows each slow call arriving before the kill, answered after it.
    abandoned = wait_for(
        lambda: stack.receiver.deliveries(delivery.path, accepted_only=False),
        TIMEOUT,
        "the held delivery to end with its sender",
    )
    stack.receiver.release(delivery.path)
    in_flight = {"delivery": abandoned[0].status == ABANDONED}
    for name, conn, path, seconds in (
        ("poll", poll.conn, history, 15.0),
        ("action", action.conn, action_post, 5.0),
        ("reply", reply.conn, reply_post, 5.0),
    ):
        in_flight[name] = bool(
            wait_for(
                lambda c=conn, p=path, s=seconds: c.calls(p) and time.time() > killed + s,
                TIMEOUT,
                f"the slow {name} call to be answered",
            )
            and arrived_before(conn, path, killed, seconds)
        )
    return Crash(killed, poll, delivery, action, reply, said, task, in_flight)


def delivered_after(stack: FaultStack, crash: Crash, c: Room, label: str, scenario: str) -> float:
    """Wait until everything said in ``label``'s room before the kill reached its webhook;
    record the scenario's figures; the recovery time (from the kill to the last delivery)."""
    wanted = crash.said[label]
    recovery = delivered(stack, c, wanted, crash.killed)
    stack.quiet(c.conn)
    got = [d.json["message"] for d in stack.accepted(c.path)]
    most = most_calls(c.conn.call_times())
    stack.record(
        Figures(
            f"{scenario}, restart {KILL_DELAY:g} s later",
            lost=len(set(wanted) - set(got)),
            doubled=keys_doubled(stack, c.path),
            most_calls=most,
            recovery=f"every event delivered {recovery:.1f} s after the kill",
        )
    )
    assert got == wanted, got  # once each (and in order: one subscription's events are)
    assert most <= CAPACITY
    return recovery


def test_sigkill_mid_poll_every_message_becomes_one_event(stack: FaultStack, crash: Crash) -> None:
    scenario = "1. SIGKILL of every worker mid-poll (in a 15 s history call)"
    recovery = delivered_after(stack, crash, crash.poll, "c1", scenario)
    assert crash.in_flight["poll"], "the poll was not inside its history call at the kill"
    assert [e.state for e in stack.outbox(crash.poll.conn)] == ["delivered"] * 3
    assert recovery <= 30


def test_sigkill_mid_delivery_every_pending_event_arrives_once_within_30s(
    stack: FaultStack, crash: Crash
) -> None:
    scenario = "2. SIGKILL of every worker mid-delivery (the receiver holding it)"
    recovery = delivered_after(stack, crash, crash.delivery, "c2", scenario)
    assert crash.in_flight["delivery"], "no delivery was held when the workers died"
    assert recovery <= 30


def test_sigkill_mid_post_the_action_task_posts_once(stack: FaultStack, crash: Crash) -> None:
    """The task comes back after the broker's visibility timeout (15 s here), finds its own
    earlier post in the room's history, and does not post again."""
    crash.task.get(timeout=RECOVERY_TIMEOUT)
    assert crash.task.date_done is not None
    recovery = crash.task.date_done.timestamp() - crash.killed
    stack.quiet(crash.action.conn)
    texts = stack.texts(crash.action.room)
    most = most_calls(crash.action.conn.call_times())
    stack.record(
        Figures(
            "3a. SIGKILL of every worker mid-post (a `post_message` task in a 5 s POST), "
            "restart 3 s later",
            lost=0 if texts else 1,
            doubled=doubled(texts),
            most_calls=most,
            recovery=f"the task done {recovery:.1f} s after the kill (visibility timeout "
            f"{VISIBILITY_TIMEOUT:g} s)",
        )
    )
    assert crash.in_flight["action"], "the action's POST was not in flight at the kill"
    assert texts == ["c3a once"]
    assert crash.task.result.get("repeated") is True  # it found its own earlier post
    assert most <= CAPACITY
    assert recovery <= VISIBILITY_TIMEOUT + RESTORE_INTERVAL_SECONDS + 5


def reply_event(stack: FaultStack, crash: Crash) -> Any:
    """The reply subscription's event for the user's message, once delivered."""
    return wait_for(
        lambda: [
            e
            for e in stack.outbox(crash.reply.conn)
            if e.state == "delivered" and e.payload["message"] == crash.said["c3"][0]
        ],
        RECOVERY_TIMEOUT,
        "the reply delivered",
        describe=stack.describe,
    )[0]


def test_sigkill_mid_post_the_reply_is_posted_once(stack: FaultStack, crash: Crash) -> None:
    """The killed delivery is sent again (by the relay, or by the broker after its visibility
    timeout); it finds its own earlier post, and the reply is in the room once."""
    recovery = reply_event(stack, crash).delivered_at.timestamp() - crash.killed
    texts = stack.texts(crash.reply.room)
    replies = texts.count("re: c3 hello")
    most = most_calls(crash.reply.conn.call_times())
    stack.record(
        Figures(
            "3b. SIGKILL of every worker mid-post (a `--reply` delivery in a 5 s POST), "
            "restart 3 s later",
            lost=int(replies == 0),
            doubled=max(0, replies - 1),
            most_calls=most,
            recovery=f"the delivery done {recovery:.1f} s after the kill",
        )
    )
    assert crash.in_flight["reply"], "the reply's POST was not in flight at the kill"
    assert replies == 1, texts
    assert most <= CAPACITY
    assert recovery <= 30


@pytest.mark.xfail(
    strict=True,
    reason="a post is remembered as the connection's own only once HipChat's answer is back: "
    "the reply a killed worker had in flight is seen by the next polls as anyone's message and "
    "answered ('re: re: c3 hello') before the redelivered delivery finds and remembers it "
    "(docs/reliability.md, 'What it does not promise')",
)
def test_sigkill_mid_post_the_reply_is_not_answered_by_its_own_subscription(
    stack: FaultStack, crash: Crash
) -> None:
    reply_event(stack, crash)
    polls = len(crash.reply.history_calls())
    wait_for(
        lambda: len(crash.reply.history_calls()) >= polls + 3,
        TIMEOUT,
        "three more polls",
    )
    stack.quiet(crash.reply.conn)
    assert stack.texts(crash.reply.room) == ["c3 hello", "re: c3 hello"]


# -- 4. Redis restarted empty ---------------------------------------------------------------------
def test_redis_restarted_empty_the_ceiling_holds_and_polls_resume(stack: FaultStack) -> None:
    """A connection that wants 13 calls a second (6 rooms' history and participants, the room
    list) against 20 per 4 s, when Redis comes back empty: the budget's log is gone, so the
    first window after the loss is refused; no window of the emulator's log holds more than
    20 calls; polls resume and every message said before and after becomes one event."""
    s = watched(stack, "s4")
    busy = [stack.room(f"s4 busy {i}") for i in range(5)]
    for room in [s.room, *busy]:
        stack.subscribe(s.conn, room, "log", {}, event="room_enter")
    for room in busy:
        stack.subscribe(s.conn, room, "log", {})
    stack.subscribe(s.conn, None, "log", {}, event="room_created")
    stack.wait_primed(s.conn)
    saturated = time.time()
    wait_for(
        lambda: len([t for t in s.conn.call_times() if t > saturated]) >= 2 * CAPACITY,
        TIMEOUT,
        "the budget saturated for two windows",
    )
    said = ["s4 before 0", "s4 before 1"]
    for text in said:
        s.say(text)
    # Celery 5.7 / kombu 5.7 workers may exit on the reconnection ("Unrecoverable error:
    # AttributeError ... 'hostname'" in kombu's restore_unacked): they are restarted here as a
    # supervisor would, and the exits reported.
    with stack.supervised() as exits:
        lost_at = time.time()
        stack.redis.restart(empty=True)
        back = time.time()
        for text in ("s4 after 0", "s4 after 1"):
            said.append(text)
            s.say(text)
        recovery = delivered(stack, s, said, back)
    stack.quiet(s.conn)
    times = s.conn.call_times()
    before = max(t for t in times if t < lost_at)
    resumed_after = min(t for t in times if t > back) - back
    most = most_calls(times)
    stack.record(
        Figures(
            "4. Redis restarted empty under a saturated budget",
            lost=len(set(said) - set(received(stack, s.path))),
            doubled=keys_doubled(stack, s.path),
            most_calls=most,
            recovery=f"calls resumed {resumed_after:.1f} s after Redis came back (one "
            f"refused window: {WINDOW + 1:g} s); every event {recovery:.1f} s after; "
            f"processes that exited on the reconnection: {'; '.join(exits) or 'none'}",
        )
    )
    assert most <= CAPACITY
    assert min(t for t in times if t > back) - before >= WINDOW  # the refused window
    assert sorted(d.json["message"] for d in stack.accepted(s.path)) == sorted(said)
    assert keys_doubled(stack, s.path) == 0
    assert recovery <= 45


# -- 5. PostgreSQL stopped for 15 s ---------------------------------------------------------------
PG_DOWN_SECONDS = 15.0


def test_postgresql_stopped_for_15s_nothing_is_lost_and_polls_resume(stack: FaultStack) -> None:
    s = watched(stack, "s5")
    stack.wait_primed(s.conn)
    s.say("s5 before")
    wait_for(lambda: "s5 before" in received(stack, s.path), TIMEOUT, "the first event")
    stopped = time.time()
    stack.pg.stop()
    said = ["s5 before", "s5 during 0"]
    s.say(said[-1])
    down_status = stack.status()
    said.append("s5 during 1")
    s.say(said[-1])
    wait_for(lambda: time.time() >= stopped + PG_DOWN_SECONDS, 2 * PG_DOWN_SECONDS, "15 s")
    stack.pg.start()
    back = time.time()
    stack.rt.db.dispose()  # this process's pooled connections died with the server
    recovery = delivered(stack, s, said, back)
    polled = min(c.time for c in s.history_calls() if c.time > back) - back
    during = [c for c in s.conn.calls() if stopped + 1 < c.time < back]
    after_status = stack.status()
    stack.quiet(s.conn)
    most = most_calls(s.conn.call_times())
    code, _, error = down_status
    stack.record(
        Figures(
            f"5. PostgreSQL stopped for {PG_DOWN_SECONDS:g} s",
            lost=len(set(said) - set(received(stack, s.path))),
            doubled=keys_doubled(stack, s.path),
            most_calls=most,
            recovery=f"first poll {polled:.1f} s after it was back, every event {recovery:.1f} "
            f"s after; `status` exited {code} meanwhile ({error.strip()[:40]}...), "
            f"{after_status[0]} after",
        )
    )
    assert code == 1, down_status
    assert "database unavailable" in error, error
    assert during == [], "no poll can run without its state: no HipChat call meanwhile"
    assert sorted(d.json["message"] for d in stack.accepted(s.path)) == sorted(said)
    assert keys_doubled(stack, s.path) == 0
    assert most <= CAPACITY
    assert polled <= 10
    assert recovery <= 30
    assert after_status[1] is not None, after_status


# -- what the faults left behind ------------------------------------------------------------------
def test_no_secret_reached_any_output_and_every_process_is_up(stack: FaultStack) -> None:
    """Crashes, a lost Redis and a lost database make the processes log errors and
    tracebacks: none carries a token, a webhook secret or the Fernet key, and neither do the
    command line's answers (``status --json`` included) or the figures."""
    haystacks = {f"{name} log": text for name, text in stack.logs().items()}
    haystacks["CLI output"] = "\n".join(stack.cli_output)
    haystacks["figures"] = "\n".join(f.row() for f in stack.figures)
    haystacks["redis log"] = stack.redis.log_tail(100_000)
    for secret in stack.secrets:
        for where, text in haystacks.items():
            assert secret not in text, f"a secret ({secret[:6]}...) is in the {where}"
    for name, service in stack.services.items():
        assert service.alive(), f"{name} is not running:\n{service.log_text()[-3000:]}"
