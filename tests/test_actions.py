"""The actions of the seeds (tasks.actions.Actions) against the emulator over real HTTP:
good input, every bad input, and the connection's token bucket on every call."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator import EmulatorServer, ManualClock
from storage.errors import (
    BucketEmpty,
    NeedsAttention,
    NotFound,
    RateLimited,
    ValidationError,
)
from tasks.actions import Actions, run_action
from tasks.posts import message_key, notification_key
from tasks.runtime import Runtime
from tests.actions_support import BodySpy, add_connection, make_runtime

GENERAL, OPS_ROOM = 10001, 10002  # seeded: General is public, Ops Room private
ALICE, BOB = 2, 3
FIVE_COLORS = {"yellow", "green", "red", "purple", "gray"}


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return make_runtime(tmp_path)


@pytest.fixture
def conn_id(rt: Runtime, emulator: EmulatorServer, emulator_token: str) -> int:
    return add_connection(rt, "ops", emulator.base_url, emulator_token)


@pytest.fixture
def api(rt: Runtime, conn_id: int) -> Actions:
    return Actions(rt, "ops")


def history(emulator: EmulatorServer, room: int | str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = emulator.state.history(room)
    return items


def calls(emulator: EmulatorServer) -> int:
    return len(emulator.state.call_log.select())


# -- list users in a room ----------------------------------------------------------------


def test_list_room_users_of_a_private_room_are_its_members(api: Actions) -> None:
    result = api.list_room_users("Ops Room")

    assert result["room"] == {"id": OPS_ROOM, "name": "Ops Room", "privacy": "private"}
    assert result["source"] == "members"
    assert {u["mention_name"] for u in result["items"]} == {"admin", "AliceA", "bobb"}
    assert {"id", "mention_name", "name"} <= set(result["items"][0])  # the seed's UserList


def test_list_room_users_of_a_public_room_are_its_participants_offline_included(
    api: Actions, emulator: EmulatorServer
) -> None:
    emulator.state.enter_room("General", "AliceA")
    emulator.state.enter_room("General", "bobb")
    emulator.state.leave_room("General", "bobb")  # offline now, still a participant

    result = api.list_room_users(GENERAL)

    assert result["source"] == "participants"
    assert result["room"]["privacy"] == "public"
    assert sorted(u["id"] for u in result["items"]) == [ALICE, BOB]


def test_room_given_as_a_string_of_digits_is_an_id(api: Actions) -> None:
    assert api.list_room_users(str(OPS_ROOM))["room"]["name"] == "Ops Room"


def test_list_room_users_of_an_unknown_room_is_not_found(api: Actions) -> None:
    with pytest.raises(NotFound, match="Room No Such Room not found"):
        api.list_room_users("No Such Room")


# -- get a user ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref", [ALICE, str(ALICE), "alicea@example.com", "@AliceA", "AliceA", " @alicea "]
)
def test_get_user_by_id_email_or_mention(api: Actions, ref: int | str) -> None:
    user = api.get_user(ref)

    assert (user["id"], user["email"], user["mention_name"]) == (
        ALICE,
        "alicea@example.com",
        "AliceA",
    )
    assert user["name"] == "Alice Anders"


def test_a_bare_mention_name_is_sent_with_its_at_sign(
    api: Actions, emulator: EmulatorServer
) -> None:
    api.get_user("bobb")

    # HipChat only reads "bobb" as a mention with the "@" (%40 in the path).
    assert emulator.state.call_log.select()[-1].path == "/v2/user/%40bobb"


@pytest.mark.parametrize("ref", ["@nobody", "nobody@example.com", 99])
def test_get_unknown_user_is_not_found(api: Actions, ref: int | str) -> None:
    with pytest.raises(NotFound, match="User not found"):
        api.get_user(ref)


@pytest.mark.parametrize("ref", ["", "   ", 0, -3, True, "x" * 101])
def test_get_user_refuses_what_is_not_a_user_before_any_call(
    api: Actions, emulator: EmulatorServer, ref: Any
) -> None:
    with pytest.raises(ValidationError, match="user must be an id, an email or an @mention"):
        api.get_user(ref)
    assert calls(emulator) == 0


# -- post a message ------------------------------------------------------------------------


def test_post_message_appears_in_the_room(api: Actions, emulator: EmulatorServer) -> None:
    result = api.post_message("General", "hello from the test")

    [item] = history(emulator, "General")
    assert result == {"id": item["id"], "timestamp": item["date"]}
    assert (item["type"], item["message"], item["from"]["id"]) == (
        "message",
        "hello from the test",
        1,
    )


def test_post_message_of_exactly_1000_characters_is_sent(
    api: Actions, emulator: EmulatorServer
) -> None:
    api.post_message(GENERAL, "x" * 1000)
    assert history(emulator, GENERAL)[-1]["message"] == "x" * 1000


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("", "message must be 1..1000 characters (got 0)"),
        ("x" * 1001, "message must be 1..1000 characters (got 1001)"),
        (None, "message must be text"),
    ],
)
def test_post_message_refuses_a_bad_message_before_any_call(
    api: Actions, emulator: EmulatorServer, message: Any, error: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        api.post_message("General", message)
    assert caught.value.errors == [error]
    assert calls(emulator) == 0


def test_post_message_lists_every_problem_at_once(api: Actions) -> None:
    with pytest.raises(ValidationError) as caught:
        api.post_message("", "")
    assert caught.value.errors == [
        "room must be an id or a name of 1..100 characters",
        "message must be 1..1000 characters (got 0)",
    ]


def test_post_message_to_an_unknown_room_is_not_found(api: Actions) -> None:
    with pytest.raises(NotFound, match="Room Nowhere not found"):
        api.post_message("Nowhere", "hi")


# -- send a notification -------------------------------------------------------------------


@pytest.mark.parametrize("color", sorted(FIVE_COLORS))
@pytest.mark.parametrize("message_format", ["text", "html"])
def test_send_notification_with_each_colour_and_format(
    api: Actions, emulator: EmulatorServer, color: str, message_format: str
) -> None:
    result = api.send_notification(
        "General", "<b>deployed</b>", color=color, message_format=message_format
    )

    item = history(emulator, "General")[-1]
    assert (item["type"], item["color"], item["message_format"]) == (
        "notification",
        color,
        message_format,
    )
    assert item["message"] == "<b>deployed</b>"
    assert result == {
        "sent": True,
        "color": color,
        "message_format": message_format,
        "notify": False,
    }


def test_random_colour_is_resolved_by_hipchat(api: Actions, emulator: EmulatorServer) -> None:
    for _ in range(5):
        api.send_notification("General", "dice", color="random")

    assert {item["color"] for item in history(emulator, "General")} <= FIVE_COLORS


def test_grey_is_taken_for_gray_as_factor_spells_it(api: Actions, emulator: EmulatorServer) -> None:
    assert api.send_notification("General", "hi", color="grey")["color"] == "gray"
    assert history(emulator, "General")[-1]["color"] == "gray"


def test_notify_flag_and_from_label_are_sent(
    api: Actions, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BodySpy(monkeypatch)

    api.send_notification("General", "wake up", notify=True, from_="f" * 64)
    api.send_notification("General", "quiet")

    assert [(b["notify"], b.get("from")) for b in spy.bodies("/notification")] == [
        (True, "f" * 64),
        (False, None),
    ]
    assert history(emulator, "General")[-2]["from"] == "f" * 64


def test_notification_of_10000_characters_is_sent(api: Actions, emulator: EmulatorServer) -> None:
    api.send_notification("General", "y" * 10_000, message_format="text")
    assert len(history(emulator, "General")[-1]["message"]) == 10_000


def test_send_notification_lists_every_problem_at_once_before_any_call(
    api: Actions, emulator: EmulatorServer
) -> None:
    with pytest.raises(ValidationError) as caught:
        api.send_notification(
            "General",
            "z" * 10_001,
            color="blue",
            message_format="markdown",
            notify="yes",  # type: ignore[arg-type]
            from_="f" * 65,
        )

    assert caught.value.errors == [
        "message must be 1..10000 characters (got 10001)",
        "color must be one of yellow, green, red, purple, gray, random, not 'blue'",
        "message_format must be text or html, not 'markdown'",
        "notify must be true or false",
        "from must be text of at most 64 characters",
    ]
    assert calls(emulator) == 0


def test_empty_notification_is_refused(api: Actions) -> None:
    with pytest.raises(ValidationError, match=r"message must be 1\.\.10000 characters \(got 0\)"):
        api.send_notification("General", "")


def test_notification_to_an_unknown_room_is_not_found(api: Actions) -> None:
    with pytest.raises(NotFound):
        api.send_notification("Nowhere", "hi")


# -- add a member ------------------------------------------------------------------------


@pytest.fixture
def carol(emulator: EmulatorServer) -> dict[str, Any]:
    user: dict[str, Any] = emulator.state.create_user("Carol Clark", "carol", "carol@example.com")
    return user


def members(emulator: EmulatorServer, room: int) -> set[int]:
    with emulator.state.lock:
        return set(emulator.state.find_room(room).members)


@pytest.mark.parametrize("how", ["id", "id-string", "email", "@mention", "mention"])
def test_add_member_to_a_private_room(
    api: Actions, emulator: EmulatorServer, carol: dict[str, Any], how: str
) -> None:
    ref = {
        "id": carol["id"],
        "id-string": str(carol["id"]),
        "email": "carol@example.com",
        "@mention": "@carol",
        "mention": "carol",
    }[how]

    result = api.add_member("Ops Room", ref)

    assert result["added"] is True
    assert result["room"] == OPS_ROOM
    assert carol["id"] in members(emulator, OPS_ROOM)


def test_adding_an_existing_member_again_is_harmless(
    api: Actions, emulator: EmulatorServer
) -> None:
    before = members(emulator, OPS_ROOM)
    api.add_member(OPS_ROOM, "@bobb")
    assert members(emulator, OPS_ROOM) == before


def test_add_member_to_a_public_room_is_a_clear_validation_error(
    api: Actions, emulator: EmulatorServer, carol: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError) as caught:
        api.add_member("General", "@carol")

    assert caught.value.errors == [
        "room 'General' is public; only private rooms have members to add"
    ]
    # The room was looked up; nothing was attempted on it.
    assert [c.method for c in emulator.state.call_log.select()] == ["GET"]


def test_add_unknown_user_is_not_found_and_names_the_user(api: Actions) -> None:
    with pytest.raises(NotFound, match=r"user 'ghost@example\.com' not found"):
        api.add_member("Ops Room", "ghost@example.com")


def test_add_member_to_an_unknown_room_is_not_found(api: Actions) -> None:
    with pytest.raises(NotFound, match="Room Nowhere not found"):
        api.add_member("Nowhere", "@bobb")


def test_add_member_checks_room_and_user_before_any_call(
    api: Actions, emulator: EmulatorServer
) -> None:
    with pytest.raises(ValidationError) as caught:
        api.add_member("", " ")
    assert caught.value.errors == [
        "room must be an id or a name of 1..100 characters",
        "user must be an id, an email or an @mention name",
    ]
    assert calls(emulator) == 0


# -- the connection ---------------------------------------------------------------------


def test_unknown_connection_is_refused(rt: Runtime) -> None:
    with pytest.raises(ValidationError, match="no connection 'nope'"):
        Actions(rt, "nope")


def test_connection_that_needs_a_new_token_is_refused(rt: Runtime, conn_id: int) -> None:
    from storage import connections as conns

    with rt.db.session() as s:
        conns.set_connection_state(s, conn_id, "auth_failed", "HTTP 401")
    with pytest.raises(NeedsAttention, match="needs a new token"):
        Actions(rt, conn_id)


def test_repr_never_shows_the_token(api: Actions, emulator_token: str) -> None:
    assert emulator_token not in repr(api)
    assert repr(api) == "Actions(connection='ops')"


# -- the bucket ------------------------------------------------------------------------------

ACTION_CALLS: list[tuple[str, Callable[[Actions], object], int]] = [
    ("list_room_users", lambda a: a.list_room_users("Ops Room"), 2),
    ("get_user", lambda a: a.get_user("@bobb"), 1),
    ("post_message", lambda a: a.post_message("General", "hi"), 1),
    ("send_notification", lambda a: a.send_notification("General", "hi"), 1),
    ("add_member", lambda a: a.add_member("Ops Room", "@admin"), 2),
]


@pytest.mark.parametrize(
    ("name", "call", "hipchat_calls"), ACTION_CALLS, ids=[c[0] for c in ACTION_CALLS]
)
def test_every_action_takes_one_token_per_hipchat_call(
    rt: Runtime,
    conn_id: int,
    api: Actions,
    emulator: EmulatorServer,
    name: str,
    call: Callable[[Actions], object],
    hipchat_calls: int,
) -> None:
    before = rt.budget.usage(conn_id).used

    call(api)

    assert calls(emulator) == hipchat_calls
    assert rt.budget.usage(conn_id).used == before + hipchat_calls


@pytest.fixture
def small_bucket(tmp_path: Path, emulator: EmulatorServer, emulator_token: str) -> Actions:
    rt = make_runtime(tmp_path, bucket_capacity=2)
    add_connection(rt, "ops", emulator.base_url, emulator_token)
    return Actions(rt, "ops")


@pytest.mark.parametrize(
    ("name", "call", "hipchat_calls"), ACTION_CALLS, ids=[c[0] for c in ACTION_CALLS]
)
def test_an_exhausted_bucket_stops_every_action_before_hipchat(
    small_bucket: Actions,
    emulator: EmulatorServer,
    name: str,
    call: Callable[[Actions], object],
    hipchat_calls: int,
) -> None:
    small_bucket.post_message("General", "one")
    small_bucket.post_message("General", "two")

    with pytest.raises(BucketEmpty) as caught:
        call(small_bucket)

    assert 0 < caught.value.retry_after <= 61  # the window and its 1 s margin
    assert calls(emulator) == 2  # the refused call never reached HipChat
    assert small_bucket.rt.budget.usage(small_bucket.connection_id).reserved == 0


# -- flood control ---------------------------------------------------------------------------


def test_flood_control_is_rate_limited_with_the_wait_hipchat_states(
    tmp_path: Path, make_emulator: Callable[..., EmulatorServer]
) -> None:
    clock = ManualClock(time.time())
    server = make_emulator(flood_limit=2, flood_window_seconds=120.0, clock=clock)
    rt = make_runtime(tmp_path)
    add_connection(rt, "ops", server.base_url, server.admin_token)
    api = Actions(rt, "ops")
    api.post_message("General", "one")
    api.send_notification("General", "two")  # notifications count against the same window

    before = time.time()
    with pytest.raises(RateLimited) as caught:
        api.post_message("General", "three")
    after = time.time()

    reset = math.ceil(clock() + 120.0)  # X-FloodControl-Reset, epoch seconds
    assert caught.value.flood_control is True
    assert reset - after <= caught.value.retry_after <= reset - before
    assert [i["message"] for i in history(server, "General")] == ["one", "two"]
    # Flood control is per room: another room still takes messages.
    api.post_message("Ops Room", "elsewhere")


# -- run_action, the action targets of triggers ------------------------------------------------


def test_run_action_posts_and_describes_the_outcome(
    rt: Runtime, conn_id: int, emulator: EmulatorServer
) -> None:
    outcome = run_action(rt, conn_id, "post_message", room=GENERAL, message="pong hello")

    item = history(emulator, GENERAL)[-1]
    assert item["message"] == "pong hello"
    assert outcome == f"posted 'pong hello' (message {item['id']})"


def test_run_action_sends_a_notification_with_every_option(
    rt: Runtime, conn_id: int, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = BodySpy(monkeypatch)
    outcome = run_action(
        rt,
        conn_id,
        "send_notification",
        room="General",
        message="<i>deploy</i> done",
        color="grey",
        message_format="html",
        notify=True,
        **{"from": "CI"},
    )

    assert outcome == "sent '<i>deploy</i> done' as a gray notification"
    [body] = spy.bodies("/notification")
    assert body == {
        "message": "<i>deploy</i> done",
        "color": "gray",
        "message_format": "html",
        "notify": True,
        "from": "CI",
    }


def test_run_action_refuses_an_unknown_action(rt: Runtime, conn_id: int) -> None:
    with pytest.raises(ValidationError, match="unknown action 'add_member'"):
        run_action(rt, conn_id, "add_member", room="General")


# -- once in effect across crashes; own posts ----------------------------------------------------


def texts(emulator: EmulatorServer, room: str = "General") -> list[str]:
    return [m["message"] for m in history(emulator, room)]


def test_a_redelivered_post_finds_its_own_earlier_post_and_does_not_post_again(
    rt: Runtime, conn_id: int, emulator: EmulatorServer
) -> None:
    """The worker died after HipChat took the post, before the task was acknowledged: the
    redelivered task (same id, so same operation) finds the post and does not repeat it."""
    first = Actions(rt, "ops", operation="task:redelivered").post_message("General", "deploy 42")
    before = calls(emulator)
    again = Actions(rt, "ops", operation="task:redelivered").post_message("General", "deploy 42")
    assert again == {"id": first["id"], "timestamp": again["timestamp"], "repeated": True}
    assert texts(emulator).count("deploy 42") == 1
    assert calls(emulator) == before + 1  # one look at the room's history, no post


def test_a_post_that_never_reached_hipchat_is_made_on_redelivery(
    rt: Runtime, conn_id: int, emulator: EmulatorServer
) -> None:
    """The worker died after recording its intent, before the POST: nothing to find, so the
    redelivery posts, once."""
    assert rt.posts.begin(conn_id, "task:died-before-post") is None
    sent = Actions(rt, "ops", operation="task:died-before-post").post_message("General", "late")
    assert "repeated" not in sent
    assert texts(emulator).count("late") == 1


def test_the_same_text_from_someone_else_is_not_taken_for_the_connections_post(
    rt: Runtime, conn_id: int, api: Actions, emulator: EmulatorServer
) -> None:
    """Once the room shows who the connection posts as (a message it remembers posting),
    a message of the same text by anyone else is not its earlier post."""
    api.post_message("General", "an earlier post of ours")
    assert rt.posts.begin(conn_id, "task:crashed") is None  # the attempt that died
    emulator.state.post_message("General", emulator.state.create_user("Zed")["id"], "same")
    Actions(rt, "ops", operation="task:crashed").post_message("General", "same")
    assert texts(emulator).count("same") == 2


def test_a_redelivered_notification_is_sent_once(
    rt: Runtime, conn_id: int, emulator: EmulatorServer
) -> None:
    api = Actions(rt, "ops", operation="event:sub:3:m-1")
    api.send_notification("General", "pong once", from_="bot")
    again = Actions(rt, "ops", operation="event:sub:3:m-1").send_notification(
        "General", "pong once", from_="bot"
    )
    assert again["repeated"] is True
    assert texts(emulator).count("pong once") == 1


def test_posts_are_remembered_as_the_connections_own(
    rt: Runtime, conn_id: int, api: Actions
) -> None:
    sent = api.post_message("General", "mine")
    api.send_notification("General", "also mine", from_="bot")
    keys = [message_key(sent["id"]), notification_key("also mine", "bot"), message_key("other")]
    assert rt.posts.own(conn_id, keys) == set(keys[:2])


def test_the_command_line_waits_for_its_reserved_call(
    tmp_path: Path, emulator: EmulatorServer, emulator_token: str
) -> None:
    rt = make_runtime(
        tmp_path, bucket_capacity=1, bucket_window_seconds=0.5, bucket_margin_seconds=0.1
    )
    add_connection(rt, "ops", emulator.base_url, emulator_token)
    Actions(rt, "ops").post_message("General", "one")
    with pytest.raises(BucketEmpty):
        Actions(rt, "ops").post_message("General", "refused at once")  # the Python API
    waited = Actions(rt, "ops", wait_up_to=5).post_message("General", "two")
    assert waited["id"]
    assert texts(emulator)[-2:] == ["one", "two"]
