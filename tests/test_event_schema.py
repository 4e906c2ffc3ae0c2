"""The event payload schema (tasks.event_schema): every payload the poller builds from real
HipChat answers (the emulator's) conforms to it, and template fields are checked against it."""

from __future__ import annotations

from typing import Any

import pytest

from storage.vocabulary import Event
from tasks.event_schema import conformance, field_problem, payload_shape
from tasks.templates import compile_template
from tests.pipeline_support import ROOM, Pipeline

ROOM_LIST = (Event.ROOM_CREATED, Event.ROOM_ARCHIVED, Event.ROOM_UNARCHIVED, Event.ROOM_DELETED)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_every_payload_the_poller_builds_conforms(pipeline: Pipeline) -> None:
    p = pipeline
    for event in Event:
        p.subscribe(event, room=None if event in ROOM_LIST else ROOM)
    p.state.enter_room(ROOM, p.bob)
    p.poll()  # primes
    state = p.state
    p.say("hello @bobb, see the link https://example.com")
    state.upload_file(p.room_id, p.alice, "report.pdf", b"%PDF-1.4", message="Q3")
    state.upload_file(p.room_id, p.alice, "chart.png", b"\x89PNG\r\n", content_type="image/png")
    state.send_notification(ROOM, "<b>built</b>", from_label="CI", color="green")
    card = {"style": "link", "title": "t", "url": "https://x.example"}
    state.send_notification(ROOM, "carded", card=card, attach_to="x" * 36, message_format="text")
    state.set_topic(ROOM, p.alice, "Recipes")
    state.enter_room(ROOM, p.alice)
    state.leave_room(ROOM, p.bob)
    state.create_room("Launch")
    state.archive_room("General")
    p.poll()
    state.archive_room("General", archived=False)
    state.delete_room("Launch")
    p.poll()

    seen: dict[str, int] = {}
    for row in p.events():
        seen[row.event] = seen.get(row.event, 0) + 1
        assert conformance(row.payload, payload_shape(row.event)) == [], row.payload
    assert set(seen) == set(Event)  # every event was built and checked
    assert seen[Event.ROOM_FILE_UPLOAD] == 2
    assert seen[Event.ROOM_NOTIFICATION] == 2


def test_conformance_names_what_departs() -> None:
    shape = payload_shape("room_enter")
    payload: dict[str, Any] = {
        "event": "room_enter",
        "item": {"room": {"id": "7", "name": "Dev", "links": {}}, "sender": {"id": 2}, "x": 1},
        "connection": {"id": 1, "name": "ops"},
        "subscription": {"id": 3, "name": None},
        "matches": [],
        "message": "",
    }
    assert conformance(payload, shape) == [
        "payload.idempotency_key is missing",
        "payload.item.x is not in the schema",
        "payload.item.room.id is str, not a number",
        "payload.item.sender.name is missing",
        "payload.item.sender.mention_name is missing",
    ]


@pytest.mark.parametrize(
    ("event", "field", "problem"),
    [
        ("room_message", "item.message.message", None),
        ("room_message", "item.message.from.mention_name", None),
        ("room_message", "item.message.mentions[0].name", None),
        ("room_message", "item.room.links[self]", None),
        ("room_message", "matches[3]", None),  # the filter's groups are tasks.subscribe's check
        ("room_file_upload", "item.file.thumb_url", None),  # only images have one: render time
        ("room_notification", "item.message.color", None),
        ("room_deleted", "item.room.topic", None),
        ("room_message", "item.nope", "item has no 'nope'; it has message, room"),
        ("room_message", "item.mesage.message", "item has no 'mesage'; did you mean 'message'?"),
        ("room_enter", "item.message.message", "item has no 'message'; it has room, sender"),
        ("room_created", "item.sender", "item has no 'sender'; it has room"),
        ("room_message", "message.text", "message is a string, so .text cannot be looked up in it"),
        (
            "room_notification",
            "item.message.from.name",
            "item.message.from is a string or null, so .name cannot be looked up in it",
        ),
        (
            "room_message",
            "item.message.mentions.name",
            "item.message.mentions is a list (use [0], [1], ...), so .name cannot be looked up "
            "in it",
        ),
    ],
)
def test_template_fields_are_checked_against_the_schema(
    event: str, field: str, problem: str | None
) -> None:
    [part] = compile_template("{" + field + "}").parts
    assert not isinstance(part, str)
    assert field_problem(event, [(step.key, step.bracketed) for step in part.steps]) == problem
