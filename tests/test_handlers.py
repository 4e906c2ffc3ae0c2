"""Python handlers registered with ``@on`` (tasks.handlers): one subscription per handler,
kept in step with the code by sync_handlers, and call_handler running them with an Actions
bound to the event's connection, against the emulator over real HTTP."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from emulator import EmulatorServer
from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import InvalidInput, RetryLater, ServerError, ValidationError
from tasks import handlers
from tasks.events import message_event
from tasks.handlers import call_handler, on, sync_handlers
from tasks.hipchat_types import Message
from tasks.runtime import Runtime
from tasks.subscriptions_api import SubView
from tests.actions_support import add_connection, make_runtime

EXAMPLE = "tests.handlers_example"
PONG = "handler:tests.handlers_example:pong"
TOPIC = "handler:tests.handlers_example:topic_watcher"


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    return make_runtime(tmp_path)


@pytest.fixture
def factor(emulator: EmulatorServer) -> int:
    room_id: int = emulator.state.create_room("Factor")["id"]
    return room_id


@pytest.fixture
def ops(rt: Runtime, emulator: EmulatorServer, emulator_token: str, factor: int) -> int:
    return add_connection(rt, "ops", emulator.base_url, emulator_token)


def handler_subs(rt: Runtime) -> dict[str, SubView]:
    with rt.db.session() as s:
        return {
            row.name: SubView.of(row)
            for row in subs.list_subscriptions(s)
            if row.target_kind == "handler" and row.name
        }


# -- sync ----------------------------------------------------------------------------------


def test_sync_creates_one_subscription_per_handler(rt: Runtime, ops: int, factor: int) -> None:
    changes = sync_handlers(rt, EXAMPLE)

    assert changes == [f"added {PONG}", f"added {TOPIC}"]
    found = handler_subs(rt)
    assert set(found) == {PONG, TOPIC}
    pong = found[PONG]
    assert (pong.connection_id, pong.event, pong.room, pong.room_id, pong.filter) == (
        ops,
        "room_message",
        "Factor",
        factor,
        "ping (.*)",
    )
    assert pong.target == {"handler": "tests.handlers_example:pong"}
    assert found[TOPIC].event == "room_topic_change"


def test_sync_is_idempotent(rt: Runtime, ops: int) -> None:
    sync_handlers(rt, EXAMPLE)
    before = handler_subs(rt)

    assert sync_handlers(rt, EXAMPLE) == []
    assert sync_handlers(rt, EXAMPLE) == []
    assert handler_subs(rt) == before  # same ids: nothing was re-created


def test_sync_leaves_other_subscriptions_alone(rt: Runtime, ops: int) -> None:
    with rt.db.session() as s:
        subs.add_subscription(s, ops, "room_created", target_kind="log", target={}, name="mine")
        subs.add_subscription(
            s, ops, "room_created", target_kind="handler", target={"handler": "other:f"},
            name="handler:other:f",
        )  # fmt: skip
    sync_handlers(rt, EXAMPLE)

    with rt.db.session() as s:
        names = {row.name for row in subs.list_subscriptions(s)}
    assert names == {"mine", "handler:other:f", PONG, TOPIC}


def test_a_handler_whose_connection_does_not_exist_yet_is_added_later(
    rt: Runtime, emulator: EmulatorServer, emulator_token: str, factor: int
) -> None:
    assert sync_handlers(rt, EXAMPLE) == [
        f"skipped {PONG}: no connection 'ops'",
        f"skipped {TOPIC}: no connection 'ops'",
    ]
    assert handler_subs(rt) == {}

    add_connection(rt, "ops", emulator.base_url, emulator_token)

    assert sync_handlers(rt, EXAMPLE) == [f"added {PONG}", f"added {TOPIC}"]


@pytest.fixture
def handlers_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Writes a handlers module into tmp_path (importable); rewriting it and syncing again is
    how the code 'changes'. Yields a writer returning the module's name."""
    name = f"handlers_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewrite is always re-read

    def write(source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    yield write
    sys.modules.pop(name, None)
    for ref in [ref for ref in handlers._REGISTRY if ref.startswith(name + ":")]:
        del handlers._REGISTRY[ref]


TWO_HANDLERS = """
    from tasks.handlers import on

    @on("room_message", connection="ops", room="Factor", filter=r"ping (.*)")
    def first(event, hipchat):
        pass

    @on("room_enter", connection="ops", room="Factor")
    def second(event, hipchat):
        pass
"""


def test_a_handler_removed_from_the_code_loses_its_subscription(
    rt: Runtime, ops: int, handlers_dir: Callable[[str], str]
) -> None:
    module = handlers_dir(TWO_HANDLERS)
    sync_handlers(rt, module)
    assert set(handler_subs(rt)) == {f"handler:{module}:first", f"handler:{module}:second"}

    handlers_dir(TWO_HANDLERS.split('    @on("room_enter"')[0])  # `second` deleted

    assert sync_handlers(rt, module) == [f"removed handler:{module}:second"]
    assert set(handler_subs(rt)) == {f"handler:{module}:first"}


def test_a_handler_whose_arguments_changed_is_replaced(
    rt: Runtime, ops: int, handlers_dir: Callable[[str], str], emulator: EmulatorServer
) -> None:
    module = handlers_dir(TWO_HANDLERS)
    sync_handlers(rt, module)
    emulator.state.create_room("Other")

    handlers_dir(TWO_HANDLERS.replace('filter=r"ping (.*)"', 'filter=r"deploy (\\w+)"'))

    assert sync_handlers(rt, module) == [f"replaced handler:{module}:first"]
    assert handler_subs(rt)[f"handler:{module}:first"].filter == "deploy (\\w+)"


def test_a_broken_handlers_module_is_a_clear_error(
    rt: Runtime, ops: int, handlers_dir: Callable[[str], str]
) -> None:
    module = handlers_dir("def oops(:\n")
    expected = f"cannot import handlers module '{module}': SyntaxError"
    with pytest.raises(ValidationError, match=expected):
        sync_handlers(rt, module)

    with pytest.raises(ValidationError, match="cannot import handlers module 'no_such_mod'"):
        sync_handlers(rt, "no_such_mod")


# -- @on -------------------------------------------------------------------------------------


def test_on_checks_its_arguments_when_the_module_is_imported() -> None:
    with pytest.raises(ValidationError) as caught:

        @on("room_mesage", connection="ops", filter="(a+")
        def nope(event: dict[str, Any], hipchat: Any) -> None:
            pass

    assert caught.value.errors[0].startswith("unknown event 'room_mesage'")
    assert caught.value.errors[1] == "invalid filter '(a+': missing ): (a+"


def test_on_refuses_a_function_a_worker_could_not_import() -> None:
    with pytest.raises(ValidationError, match="@on needs a module-level function"):

        @on("room_created", connection="ops")
        def nested(event: dict[str, Any], hipchat: Any) -> None:
            pass


# -- call_handler ----------------------------------------------------------------------------


def ping_event(emulator: EmulatorServer, rt: Runtime, sub: SubView, text: str) -> dict[str, Any]:
    """The payload a poll would build for a message posted to Factor."""
    emulator.state.post_message("Factor", "AliceA", text)
    item = emulator.state.history("Factor")[-1]
    room = {"id": sub.room_id, "name": "Factor"}
    with rt.db.session() as s:
        conn = conns.get_connection(s, sub.connection_id)
        assert conn is not None
        connection = {"id": conn.id, "name": conn.name}
    return message_event(
        "room_message",
        Message.parse(item),
        room,
        connection=connection,
        subscription={"id": sub.id, "name": sub.name},
        matches=[text.removeprefix("ping ")],
    )


def test_call_handler_runs_the_function_with_an_actions_bound_to_the_connection(
    rt: Runtime, ops: int, emulator: EmulatorServer
) -> None:
    sync_handlers(rt, EXAMPLE)
    sub = handler_subs(rt)[PONG]
    event = ping_event(emulator, rt, sub, "ping hello")

    outcome = call_handler(rt, sub, event)

    assert outcome == "handler tests.handlers_example:pong ran"
    last = emulator.state.history("Factor")[-1]
    assert (last["message"], last["from"]["mention_name"]) == ("pong hello", "admin")


def test_an_exception_in_a_handler_is_retriable_and_names_its_type(
    rt: Runtime, ops: int, emulator: EmulatorServer
) -> None:
    sync_handlers(rt, EXAMPLE)
    sub = handler_subs(rt)[TOPIC]

    with pytest.raises(RetryLater) as caught:
        call_handler(rt, sub, {"event": "room_topic_change", "item": {}})

    assert isinstance(caught.value, ServerError)
    assert str(caught.value) == (
        "handler tests.handlers_example:topic_watcher raised KeyError: 'the handler has a bug'"
    )
    assert isinstance(caught.value.__cause__, KeyError)


def test_our_own_errors_inside_a_handler_keep_their_meaning(
    rt: Runtime, ops: int, emulator: EmulatorServer
) -> None:
    sync_handlers(rt, EXAMPLE)
    sub = handler_subs(rt)[PONG]
    # A pong of 1001 characters: Actions refuses it, and so must the delivery (no retry).
    event = ping_event(emulator, rt, sub, "ping " + "x" * 996)

    with pytest.raises(InvalidInput, match=r"message must be 1\.\.1000 characters"):
        call_handler(rt, sub, event)


def test_a_handler_that_no_longer_exists_is_a_clear_error(rt: Runtime, ops: int) -> None:
    sync_handlers(rt, EXAMPLE)
    sub = handler_subs(rt)[PONG]
    gone = replace(sub, target={"handler": "tests.handlers_example:vanished"})

    with pytest.raises(ValidationError, match=r"'tests\.handlers_example:vanished' not found"):
        call_handler(rt, gone, {})


def test_a_handler_moved_to_another_connection_leaves_nothing_behind(
    rt: Runtime,
    ops: int,
    handlers_dir: Callable[[str], str],
    emulator: EmulatorServer,
    emulator_token: str,
) -> None:
    module = handlers_dir(TWO_HANDLERS)
    sync_handlers(rt, module)
    lab = add_connection(rt, "lab", emulator.base_url, emulator_token)

    handlers_dir(
        TWO_HANDLERS.replace(
            'connection="ops", room="Factor", filter', 'connection="lab", room="Factor", filter'
        )
    )

    assert sync_handlers(rt, module) == [f"replaced handler:{module}:first"]
    with rt.db.session() as s:
        rows = [r for r in subs.list_subscriptions(s) if r.name == f"handler:{module}:first"]
        assert [r.connection_id for r in rows] == [lab]
