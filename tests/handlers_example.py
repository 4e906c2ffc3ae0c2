"""Handlers for tests/test_handlers.py: Factor's ping/pong, written as a Python handler, and
one that fails the way user code does."""

from __future__ import annotations

from typing import Any

from tasks.actions import Actions
from tasks.handlers import on


@on("room_message", connection="ops", room="Factor", filter=r"ping (.*)")
def pong(event: dict[str, Any], hipchat: Actions) -> None:
    hipchat.post_message("Factor", f"pong {event['matches'][0]}")


@on("room_topic_change", connection="ops", room="Factor")
def topic_watcher(event: dict[str, Any], hipchat: Actions) -> None:
    raise KeyError("the handler has a bug")
