"""The poll pipeline end to end: emulator over HTTP -> diff -> outbox + watermark.

Every test runs on SQLite + fakeredis and on PostgreSQL + real Redis (``backend``).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from storage import health as health_store
from storage import outbox
from storage import subscriptions as subs
from storage.errors import BucketEmpty
from tasks import poll as poll_module
from tasks.actions import Actions
from tasks.poll import PollResult
from tests.pipeline_support import (
    CONN,
    ROOM,
    Backend,
    Pipeline,
    make_pipeline,
)

HISTORY_KINDS = ("room_message", "room_file_upload", "room_notification", "room_topic_change")
ROOM_LIST_KINDS = ("room_created", "room_archived", "room_unarchived", "room_deleted")
PAYLOAD_KEYS = {
    "event",
    "item",
    "connection",
    "subscription",
    "matches",
    "message",
    "idempotency_key",
}


def _dispatched_ids(result: PollResult) -> list[int]:
    return sorted(i for ids in result.dispatch.values() for i in ids)


def _envelope_ok(p: Pipeline, payload: dict[str, Any], sub_id: int, event: str) -> None:
    assert set(payload) == PAYLOAD_KEYS
    assert payload["event"] == event
    assert payload["connection"] == {"id": p.conn_id, "name": "main"}
    assert payload["subscription"] == {"id": sub_id, "name": None}
    assert payload["idempotency_key"].startswith(f"sub:{sub_id}:")


# -- priming and firing -------------------------------------------------------------------


def test_history_triggers_prime_then_fire_once_each(pipeline: Pipeline) -> None:
    p = pipeline
    p.say("before the subscription")
    by_kind = {kind: p.subscribe(kind) for kind in HISTORY_KINDS}

    first = p.poll()
    assert first.skipped is None
    assert first.problems == []
    assert p.events() == []
    assert first.dispatch == {}
    for sub in by_kind.values():
        assert p.subscription(sub.id).primed_at is not None

    msg = p.say("hello @bobb")
    upload = p.state.upload_file(ROOM, p.alice, "notes.txt", b"some notes", message="the notes")
    note = p.state.send_notification(ROOM, "build green", from_label="CI")
    topic = p.state.set_topic(ROOM, p.bob, "Release day")

    second = p.poll()
    assert second.event_count == 4
    assert second.problems == []
    fired = {e.event: e for e in p.events()}
    assert set(fired) == set(HISTORY_KINDS)
    assert _dispatched_ids(second) == sorted(e.id for e in fired.values())
    assert {sub_id for sub_id in second.dispatch} == {s.id for s in by_kind.values()}

    room = {"id": p.room_id, "name": ROOM}
    payload = fired["room_message"].payload
    _envelope_ok(p, payload, by_kind["room_message"].id, "room_message")
    assert payload["item"]["message"]["id"] == msg["id"]
    assert payload["item"]["message"]["message"] == "hello @bobb"
    assert payload["item"]["message"]["from"]["id"] == p.alice
    assert {k: payload["item"]["room"][k] for k in room} == room
    assert payload["matches"] == []
    assert payload["message"] == "hello @bobb"
    assert payload["idempotency_key"] == f"sub:{by_kind['room_message'].id}:{msg['id']}"

    payload = fired["room_file_upload"].payload
    _envelope_ok(p, payload, by_kind["room_file_upload"].id, "room_file_upload")
    assert payload["item"]["message"]["id"] == upload["id"]
    assert payload["item"]["file"]["name"] == "notes.txt"
    assert payload["item"]["sender"]["id"] == p.alice

    payload = fired["room_notification"].payload
    _envelope_ok(p, payload, by_kind["room_notification"].id, "room_notification")
    assert payload["item"]["message"]["id"] == note["id"]
    assert payload["item"]["message"]["from"] == "CI"
    assert payload["message"] == "build green"

    payload = fired["room_topic_change"].payload
    _envelope_ok(p, payload, by_kind["room_topic_change"].id, "room_topic_change")
    assert payload["item"]["topic"] == "Release day"
    assert payload["item"]["sender"]["id"] == p.bob
    assert payload["item"]["room"]["id"] == p.room_id
    assert payload["idempotency_key"].endswith(topic["id"])

    third = p.poll()
    assert third.event_count == 0
    assert len(p.events()) == 4


def test_participant_triggers_prime_then_fire_once_each(pipeline: Pipeline) -> None:
    p = pipeline
    p.state.enter_room(ROOM, p.alice)
    enter, exit_ = p.subscribe("room_enter"), p.subscribe("room_exit")

    assert p.poll().event_count == 0
    assert p.events() == []

    p.state.enter_room(ROOM, p.bob)
    p.state.leave_room(ROOM, p.alice)
    result = p.poll()
    assert result.event_count == 2
    entered, exited = p.payloads(enter.id), p.payloads(exit_.id)
    assert len(entered) == len(exited) == 1
    _envelope_ok(p, entered[0], enter.id, "room_enter")
    assert entered[0]["item"]["sender"]["id"] == p.bob
    assert entered[0]["item"]["room"]["id"] == p.room_id
    _envelope_ok(p, exited[0], exit_.id, "room_exit")
    assert exited[0]["item"]["sender"]["id"] == p.alice

    assert p.poll().event_count == 0
    assert len(p.events()) == 2


def test_room_list_triggers_prime_then_fire_once_each(pipeline: Pipeline) -> None:
    p = pipeline
    doomed = p.state.create_room("Doomed")
    archived = p.state.create_room("Shelf")
    p.state.archive_room("Shelf")
    by_kind = {kind: p.subscribe(kind, room=None) for kind in ROOM_LIST_KINDS}

    assert p.poll().event_count == 0
    assert p.events() == []

    created = p.state.create_room("Launch")
    p.state.archive_room(ROOM)
    p.state.archive_room("Shelf", archived=False)
    p.state.delete_room("Doomed")
    result = p.poll()
    assert result.event_count == 4
    got = {kind: p.payloads(sub.id) for kind, sub in by_kind.items()}
    assert {k: len(v) for k, v in got.items()} == dict.fromkeys(ROOM_LIST_KINDS, 1)
    expected_room = {
        "room_created": created["id"],
        "room_archived": p.room_id,
        "room_unarchived": archived["id"],
        "room_deleted": doomed["id"],
    }
    for kind, (payload,) in got.items():
        _envelope_ok(p, payload, by_kind[kind].id, kind)
        assert set(payload["item"]) == {"room"}
        assert payload["item"]["room"]["id"] == expected_room[kind]
    assert got["room_deleted"][0]["item"]["room"]["name"] == "Doomed"

    assert p.poll().event_count == 0
    assert len(p.events()) == 4


def test_backfill_replays_the_last_n_at_priming(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(4):
        p.say(f"old {i}")
    sub = p.subscribe("room_message", backfill=2)
    assert p.poll().event_count == 2
    assert [x["message"] for x in p.payloads(sub.id)] == ["old 2", "old 3"]
    assert p.poll().event_count == 0


def test_regex_filter_groups_become_matches(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message", filter=r"^ping (\w+)(?: (\d+))?")
    p.poll()
    p.say("ping hello")
    p.say("no ping here")
    p.say("ping deploy 42")
    p.say("PING upper")
    assert p.poll().event_count == 2
    payloads = p.payloads(sub.id)
    assert [x["message"] for x in payloads] == ["ping hello", "ping deploy 42"]
    assert [x["matches"] for x in payloads] == [["hello", ""], ["deploy", "42"]]


def test_own_posts_fire_only_the_subscriptions_that_ask_for_them(pipeline: Pipeline) -> None:
    """No reply loop: what the connection posted (a reply, a notification) fires no history
    trigger without ``include_own``, filter or no filter; other people's posts still fire."""
    p = pipeline
    replies = p.subscribe("room_message")  # no filter: every message, its own replies too
    notes = p.subscribe("room_notification")
    mirror = p.subscribe("room_message", include_own=True)
    mirrored_notes = p.subscribe("room_notification", include_own=True)
    p.poll()
    api = Actions(p.rt, CONN)
    api.post_message(ROOM, "pong")
    api.send_notification(ROOM, "deployed", from_="bot")
    p.say("ping")
    p.state.send_notification(ROOM, "build green", from_label="CI")  # another integration's
    assert p.poll().event_count == 6
    assert [x["message"] for x in p.payloads(replies.id)] == ["ping"]
    assert [x["message"] for x in p.payloads(notes.id)] == ["build green"]
    assert [x["message"] for x in p.payloads(mirror.id)] == ["pong", "ping"]
    assert [x["message"] for x in p.payloads(mirrored_notes.id)] == ["deployed", "build green"]


def test_a_room_given_by_id_is_named_as_hipchat_names_it(pipeline: Pipeline) -> None:
    p = pipeline
    by_id = p.subscribe("room_message", room=str(p.room_id))
    assert (by_id.room_id, by_id.room_name) == (p.room_id, ROOM)
    p.poll()
    p.say("hello")
    p.poll()
    [payload] = p.payloads(by_id.id)
    assert payload["item"]["room"]["id"] == p.room_id
    assert payload["item"]["room"]["name"] == ROOM


def test_a_room_resolved_without_its_name_gets_it_at_the_next_poll(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message", room=str(p.room_id))
    with p.rt.db.session() as s:  # as a recipe stores it: the id, not yet HipChat's name
        subs.set_room_id(s, sub.id, p.room_id)
    p.poll()
    p.say("hello")
    p.poll()
    [payload] = p.payloads(sub.id)
    assert payload["item"]["room"]["name"] == ROOM
    with p.rt.db.session() as s:
        assert subs.get_subscription(s, sub.id).room_name == ROOM  # type: ignore[union-attr]


# -- what a poll costs -----------------------------------------------------------------------


def test_one_history_call_per_room_whatever_the_number_of_triggers(pipeline: Pipeline) -> None:
    p = pipeline
    for kind in ("room_message", "room_notification", "room_file_upload"):
        p.subscribe(kind)
    p.poll()
    assert p.history_calls() == 1
    p.say("one")
    p.state.send_notification(ROOM, "two")
    p.poll()
    assert p.history_calls() == 2
    assert len(p.events()) == 2
    # No room-list trigger, no participant trigger: neither list is fetched.
    assert [c for c in p.state.calls() if c.path == "/v2/room"] == []
    assert p.state.calls(path_prefix=f"/v2/room/{p.room_id}/participant") == []


def test_room_list_and_participants_are_fetched_once_per_poll(pipeline: Pipeline) -> None:
    p = pipeline
    p.subscribe("room_enter")
    p.subscribe("room_exit")
    p.subscribe("room_message")
    p.subscribe("room_created", room=None)
    p.subscribe("room_deleted", room=None)
    for polls in (1, 2):
        p.poll()
        assert [c.path for c in p.state.calls() if c.path == "/v2/room"] == ["/v2/room"] * polls
        participant_calls = p.state.calls(path_prefix=f"/v2/room/{p.room_id}/participant")
        assert len(participant_calls) == polls
        assert p.history_calls() == polls


def test_a_poll_cut_short_by_the_budget_resumes_with_what_it_missed(
    pipeline: Pipeline,
) -> None:
    """When every poll runs out of budget part-way, the streams it could not reach go first
    next time: none is starved."""
    p = pipeline
    p.state.create_room("Other")
    for room in (ROOM, "Other"):
        p.subscribe("room_message", room=room)
        p.subscribe("room_enter", room=room)
    p.subscribe("room_created", room=None)  # 5 streams
    tight = p.backend.runtime(bucket_capacity=3)  # 3 calls per poll

    def poll_on_a_fresh_budget() -> list[str]:
        tight.budget.clear(p.conn_id)
        tight.budget.initialise(p.conn_id)
        p.state.clear_calls()
        with pytest.raises(BucketEmpty):
            p.poll(tight)
        return [c.path for c in p.state.calls()]

    first = poll_on_a_fresh_budget()
    second = poll_on_a_fresh_budget()
    assert len(first) == len(second) == 3
    assert "/v2/room" in second  # the room list, last in a fixed order, is not starved
    assert len(set(first) | set(second)) == 5
    assert all(sub.primed_at for sub in p.all_subscriptions())


def test_a_retried_poll_skips_what_the_earlier_attempt_read(pipeline: Pipeline) -> None:
    p = pipeline
    other = p.state.create_room("Other")
    p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    p.poll()
    p.say("in dev")
    p.state.post_message("Other", p.alice, "in other")
    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{other['id']}/history")
    first = p.poll()  # Other fails on its own; Dev is read and committed
    assert first.event_count == 1
    assert list(first.failing) == [other["id"]]
    assert first.come_back == pytest.approx(5.0, abs=1.0)  # Other is due again in 5 s
    assert (p.history_calls(), p.history_calls(other["id"])) == (2, 2)
    retry = p.poll(done=first.done, now=datetime.now(UTC) + timedelta(seconds=6))
    assert retry.event_count == 1
    assert (p.history_calls(), p.history_calls(other["id"])) == (2, 3)
    assert len(p.events()) == 2


# -- history paging, odd watermarks -------------------------------------------------------------


def test_gap_larger_than_a_page_is_filled_in_order(
    backend: Backend, pipeline_emulator: Any
) -> None:
    p = make_pipeline(backend, pipeline_emulator, history_page_size=5)
    sub = p.subscribe("room_message")
    p.say("primer")
    p.poll()
    sent = [p.say(f"m{i:02d}")["id"] for i in range(12)]

    result = p.poll()
    assert result.event_count == 12
    assert [x["item"]["message"]["id"] for x in p.payloads(sub.id)] == sent
    mark = p.watermark()
    assert mark is not None
    assert mark.last_id == sent[-1]
    assert p.poll().event_count == 0
    assert len(p.events()) == 12


def test_empty_room_at_priming_then_more_than_a_page(
    backend: Backend, pipeline_emulator: Any
) -> None:
    p = make_pipeline(backend, pipeline_emulator, history_page_size=5)
    sub = p.subscribe("room_message")
    p.poll()
    mark = p.watermark()
    assert mark is not None
    assert mark.last_id is None
    assert p.subscription(sub.id).primed_at is not None

    sent = [p.say(f"m{i:02d}")["id"] for i in range(7)]
    assert p.poll().event_count == 7
    assert [x["item"]["message"]["id"] for x in p.payloads(sub.id)] == sent
    assert p.poll().event_count == 0


def test_empty_room_at_priming_then_a_few_messages(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.poll()
    p.poll()  # still empty: the marker stays
    first = p.say("first ever")
    assert p.poll().event_count == 1
    assert p.payloads(sub.id)[0]["item"]["message"]["id"] == first["id"]
    mark = p.watermark()
    assert mark is not None
    assert mark.last_id == first["id"]


def test_unknown_watermark_message_falls_back_to_dates(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.say("seen")
    p.poll()
    sent = [p.say(f"after {i}")["id"] for i in range(3)]
    # The watermark's message was deleted: HipChat refuses the not-before id with a 400
    # (the emulator cannot delete messages, so the 400 is injected). The poll pages back
    # by date from now to the watermark's date instead.
    p.state.inject_fault("status", status=400, path_prefix=f"/v2/room/{p.room_id}/history/latest")
    assert p.poll().event_count == 3
    assert [x["item"]["message"]["id"] for x in p.payloads(sub.id)] == sent
    mark = p.watermark()
    assert mark is not None
    assert mark.last_id == sent[-1]
    assert p.poll().event_count == 0


# -- failures ---------------------------------------------------------------------------------


LATER = timedelta(seconds=6)  # past a room's first backoff (5 s)


@pytest.mark.parametrize("fault", ["malformed_json", "truncated_json"])
def test_malformed_history_leaves_the_watermark(pipeline: Pipeline, fault: str) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.say("primer")
    p.poll()
    before = p.watermark()
    sent = [p.say(f"m{i}")["id"] for i in range(3)]

    p.state.inject_fault(fault, path_prefix=f"/v2/room/{p.room_id}/history")
    result = p.poll()
    assert result.event_count == 0
    assert "not JSON" in result.failing[p.room_id]
    assert result.status.startswith("failing; room")
    after = p.watermark()
    assert before is not None
    assert after is not None
    assert (after.last_id, after.last_date) == (before.last_id, before.last_date)
    assert p.events() == []

    assert p.poll().waiting == [p.room_id]  # backing off: not read again at once
    assert p.poll(now=datetime.now(UTC) + LATER).event_count == 3
    assert [x["item"]["message"]["id"] for x in p.payloads(sub.id)] == sent


def test_malformed_participants_leave_the_snapshot(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_enter")
    p.poll()
    p.state.enter_room(ROOM, p.bob)
    p.state.inject_fault("malformed_json", path_prefix=f"/v2/room/{p.room_id}/participant")
    result = p.poll()
    assert result.event_count == 0
    assert p.room_id in result.failing
    assert p.poll(now=datetime.now(UTC) + LATER).event_count == 1
    assert p.payloads(sub.id)[0]["item"]["sender"]["id"] == p.bob


def test_a_server_error_stays_with_its_room_and_keeps_the_watermark(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.poll()
    p.say("hello")
    p.state.inject_fault("status", status=503, path_prefix=f"/v2/room/{p.room_id}/history")
    result = p.poll()
    assert "HTTP 503" in result.failing[p.room_id]
    assert p.events() == []
    assert p.poll(now=datetime.now(UTC) + LATER).event_count == 1
    assert len(p.events(sub.id)) == 1


def test_one_failing_room_holds_back_no_other_room(pipeline: Pipeline) -> None:
    """A room answering 500 for ever: every other room is still read each poll, at once."""
    p = pipeline
    other = p.state.create_room("Other")
    first = p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    p.poll()
    p.state.inject_fault("status", status=500, path_prefix=f"/v2/room/{other['id']}", count=100)
    now = datetime.now(UTC)
    for minute in range(4):
        p.say(f"in dev {minute}")
        result = p.poll(now=now + timedelta(minutes=minute))
        assert result.event_count == 1
        assert list(result.dispatch) == [first.id]
        assert result.status.startswith("failing; room")
    # Tried again after a growing wait, never more than once per poll.
    assert p.history_calls(other["id"]) <= 1 + 4
    p.rt.health.flush()
    with p.rt.db.session() as s:
        stored = health_store.get_health(s, p.conn_id)
    failing = stored.rooms[str(other["id"])]
    assert "HTTP 500" in failing["error"]
    assert failing["attempts"] >= 2
    assert stored.failing_since is not None
    assert stored.last_ok_at is not None
    assert stored.last_ok_at < stored.failing_since


def test_partial_result_survives_a_wait_for_the_budget(pipeline: Pipeline) -> None:
    """Rooms committed before the budget ran out are reported for dispatch."""
    p = pipeline
    p.state.create_room("Other")
    first = p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    p.poll()
    p.say("in dev")
    p.state.post_message("Other", p.alice, "in other")
    tight = p.backend.runtime(bucket_capacity=1)
    tight.budget.clear(p.conn_id)
    tight.budget.initialise(p.conn_id)
    partial = PollResult(p.conn_id)
    with pytest.raises(BucketEmpty):
        p.poll(tight, result=partial)
    assert list(partial.dispatch) == [first.id]
    assert _dispatched_ids(partial) == [e.id for e in p.events()]


def test_revoked_token_pauses_the_connection_with_a_reason(pipeline: Pipeline) -> None:
    p = pipeline
    p.subscribe("room_message")
    p.poll()
    p.state.revoke_token(p.token)
    result = p.poll()
    assert result.problems
    row = p.connection()
    assert row.state == "auth_failed"
    assert row.state_reason
    assert "401" in row.state_reason
    assert p.token not in row.state_reason
    with p.rt.db.session() as s:
        assert p.token not in (health_store.get_health(s, p.conn_id).status or "")
    assert p.poll().skipped == "connection missing or not active"


def test_deleted_room_marks_its_subscriptions(pipeline: Pipeline) -> None:
    p = pipeline
    gone = p.subscribe("room_message")
    p.state.create_room("Stays")
    stays = p.subscribe("room_message", room="Stays")
    p.poll()
    p.state.delete_room(ROOM)
    p.state.post_message("Stays", p.alice, "still here")
    result = p.poll()
    assert any("not found" in problem for problem in result.problems)
    row = p.subscription(gone.id)
    assert row.state == "error"
    assert row.state_reason
    assert ROOM in row.state_reason
    assert p.subscription(stays.id).state == "active"
    assert len(p.events(stays.id)) == 1
    assert p.connection().state == "active"


def test_unresolvable_room_name_marks_the_subscription(pipeline: Pipeline) -> None:
    p = pipeline
    with p.rt.db.session() as s:  # stored while HipChat could not be asked (room_id unknown)
        row = subs.add_subscription(
            s, p.conn_id, "room_message", room="Nowhere", target_kind="log", target={}
        )
        sub_id = row.id
    p.poll()
    found = p.subscription(sub_id)
    assert found.state == "error"
    assert "Nowhere" in (found.state_reason or "")


# -- atomicity and idempotency ------------------------------------------------------------------


def test_failed_add_events_rolls_back_the_watermark(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.say("primer")
    p.poll()
    before = p.watermark()
    sent = [p.say(f"m{i}")["id"] for i in range(3)]
    real_add = outbox.add_events

    def add_then_fail(s: Any, events: Any, **kw: Any) -> Any:
        real_add(s, events, **kw)  # the rows are written ...
        raise RuntimeError("database went away mid-transaction")  # ... and rolled back

    monkeypatch.setattr(outbox, "add_events", add_then_fail)
    with pytest.raises(RuntimeError):
        p.poll()
    after = p.watermark()
    assert before is not None
    assert after is not None
    assert after.last_id == before.last_id
    assert p.events() == []

    monkeypatch.setattr(outbox, "add_events", real_add)
    assert p.poll().event_count == 3
    assert [x["item"]["message"]["id"] for x in p.payloads(sub.id)] == sent


def test_failed_commit_rolls_back_events_and_watermark(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.poll()
    p.say("one")
    p.say("two")

    def failing_mark_primed(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("crash after the watermark and the events were written")

    # A new subscription on the same room makes the commit prime it after add_events.
    p.subscribe("room_notification")
    monkeypatch.setattr(subs, "mark_primed", failing_mark_primed)
    with pytest.raises(RuntimeError):
        p.poll()
    assert p.events() == []
    mark = p.watermark()
    assert mark is not None
    assert mark.last_id is None
    monkeypatch.undo()
    assert p.poll().event_count == 2
    assert len(p.events(sub.id)) == 2


def test_two_concurrent_polls_commit_each_event_once(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline
    msg_sub = p.subscribe("room_message")
    enter_sub = p.subscribe("room_enter")
    p.poll()
    sent = [p.say(f"m{i}")["id"] for i in range(5)]
    p.state.enter_room(ROOM, p.bob)

    # Both polls fetch and diff the same state, then commit at the same moment.
    barrier = threading.Barrier(2, timeout=10)
    real_commit = poll_module.Poll._commit

    def commit_together(self: Any, *args: Any) -> None:
        barrier.wait()
        real_commit(self, *args)

    monkeypatch.setattr(poll_module.Poll, "_commit", commit_together)

    results: list[PollResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(p.poll())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(results) == 2

    events = p.events()
    assert [x["item"]["message"]["id"] for x in p.payloads(msg_sub.id)] == sent
    assert len(p.events(enter_sub.id)) == 1
    dispatched = [i for r in results for i in _dispatched_ids(r)]
    assert sorted(dispatched) == [e.id for e in events]  # each event handed out once


def test_crash_between_commit_and_enqueue_is_relayed(pipeline: Pipeline) -> None:
    p = pipeline
    sub = p.subscribe("room_message")
    p.poll()
    p.say("one")
    p.say("two")
    result = p.poll()  # committed; the process "dies" before it enqueues anything
    assert result.event_count == 2
    assert p.poll().event_count == 0  # a rerun finds nothing new: no duplicate

    later = datetime.now(UTC) + timedelta(seconds=1)
    with p.rt.db.session() as s:
        stale = outbox.undispatched(s, older_than=later)
        assert [e.id for e in stale] == _dispatched_ids(result)
        assert {e.subscription_id for e in stale} == {sub.id}
        assert {e.state for e in stale} == {"pending"}


def test_a_poll_past_its_time_limit_leaves_the_rest_for_next_time(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = pipeline
    p.state.create_room("Other")
    p.subscribe("room_message")
    p.subscribe("room_message", room="Other")
    p.poll()
    real = poll_module.Poll.poll_stream

    def slow_second(self: poll_module.Poll, stream: Any) -> None:
        if stream.room_id != p.room_id:
            raise SoftTimeLimitExceeded
        real(self, stream)

    monkeypatch.setattr(poll_module.Poll, "poll_stream", slow_second)
    with pytest.raises(SoftTimeLimitExceeded):
        p.poll()
    with p.rt.db.session() as s:
        stored = health_store.get_health(s, p.conn_id)
    assert len(stored.behind) == 1
    assert stored.behind[0].startswith("history:")
    assert stored.behind[0] != f"history:{p.room_id}"
