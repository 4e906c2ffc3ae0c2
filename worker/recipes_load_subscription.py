"""Reading one item of a recipes file's ``subscriptions`` list into :class:`SubscriptionRecipe`\\ s.

Each key is checked where it stands, then the whole item goes through the rules that the
``subscribe`` command applies (:func:`tasks.subscribe.spec_errors`), each error reported at the
line of the key it is about. Errors accumulate in the shared :class:`YamlReader`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from yaml.nodes import Node, SequenceNode

from tasks.subscribe import SubscriptionSpec, spec_errors, target_errors
from worker.recipes_fields import env_value, name_problem
from worker.recipes_model import RECIPE_PREFIX, SubscriptionRecipe
from worker.yaml_reader import YamlReader, line_of, plain_value

NAME_MAX_CHARS = 64  # the subscriptions.name column
TARGET_KEYS = ("action", "webhook", "log", "handler")
SUBSCRIPTION_KEYS = (
    "name",
    "connection",
    "event",
    "room",
    "filter",
    "backfill",
    "include_own",
    *TARGET_KEYS,
)
ACTION_KEYS: dict[str, tuple[type, ...]] = {
    "action": (str,),
    "message": (str,),
    "from": (str,),
    "room": (str, int),
    "color": (str,),
    "format": (str,),
    "notify": (bool,),
}
WEBHOOK_KEYS = ("url", "secret_env")


class SubscriptionReader:
    """One item of ``subscriptions``: its keys, its target, and the shared spec checks."""

    def __init__(
        self,
        reader: YamlReader,
        environ: Mapping[str, str],
        node: Node,
        index: int,
        connections: Mapping[str, object],
    ) -> None:
        self.r = reader
        self.environ = environ
        self.node = node
        self.what = f"subscription #{index}"
        self.connections = connections
        self.fields: dict[str, tuple[Node, Node]] = {}
        self.secret: str | None = None

    def read(self, seen: dict[str, int]) -> list[SubscriptionRecipe]:
        """The recipes of this item (one per event); ``seen`` maps names to their lines."""
        fields = self.r.mapping(self.node, self.what, SUBSCRIPTION_KEYS)
        if fields is None:
            return []
        self.fields = fields
        name, connection = self._name(seen), self._connection()
        events, target = self._events(), self._target()
        room = self._optional("room", (str, int))
        # Stand-ins where a part was wrong let the shared checks run on the rest; any error
        # fails the whole file, so a stand-in is never stored.
        kind, target_dict = target or ("log", {})
        spec = SubscriptionSpec(
            connection=connection or "?",
            event="?",
            target_kind=kind,
            target=target_dict,
            room=None if room is None else str(room),
            filter=self._optional("filter", (str,)),
            backfill=self._optional("backfill", (int,)) or 0,
            include_own=bool(self._optional("include_own", (bool,))),
        )
        recipes = [self._recipe(name or "?", replace(spec, event=e)) for e in events or []]
        self._check_specs([r.spec for r in recipes])
        return recipes

    def _recipe(self, name: str, spec: SubscriptionSpec) -> SubscriptionRecipe:
        listed = isinstance(self.fields["event"][1], SequenceNode)
        stored = RECIPE_PREFIX + name + (f":{spec.event}" if listed else "")
        if len(stored) > NAME_MAX_CHARS:
            self.r.error(
                self.fields["name"][1],
                f"{self.what}: the stored name {stored!r} is longer than {NAME_MAX_CHARS} "
                "characters; shorten the name",
            )
        room = self._value("room")
        room_line = None if room is None else line_of(room)
        return SubscriptionRecipe(
            stored, replace(spec, name=stored), line_of(self.node), room_line, self.secret
        )

    def _value(self, key: str) -> Node | None:
        entry = self.fields.get(key)
        return None if entry is None else entry[1]

    def _required(self, key: str) -> Node | None:
        node = self._value(key)
        if node is None:
            self.r.error(self.node, f"{self.what}: {key} is required")
        return node

    def _optional(self, key: str, kinds: tuple[type, ...]) -> Any:
        node = self._value(key)
        return None if node is None else self.r.scalar(node, f"{self.what}: {key}", kinds)

    def _name(self, seen: dict[str, int]) -> str | None:
        node = self._required("name")
        raw = None if node is None else self.r.scalar(node, f"{self.what}: name", (str, int))
        if node is None or raw is None:
            return None
        name = str(raw)
        problem = name_problem(name, "subscription")
        if problem is not None:
            self.r.error(node, problem)
            return None
        self.what = f"subscription {name}"
        if name in seen:
            self.r.error(node, f"duplicate subscription name {name!r} (first at line {seen[name]})")
            return None
        seen[name] = line_of(node)
        return name

    def _connection(self) -> str | None:
        node = self._required("connection")
        name = None if node is None else self.r.text(node, f"{self.what}: connection")
        if node is None or name is None:
            return None
        if name not in self.connections:
            self.r.error(node, f"{self.what}: connection {name!r} is not defined in this file")
            return None
        return name

    def _events(self) -> list[str] | None:
        node = self._required("event")
        if node is None:
            return None
        if not isinstance(node, SequenceNode):
            event = self.r.text(node, f"{self.what}: event")
            return None if event is None else [event]
        events: list[str] = []
        for item in node.value:
            event = self.r.text(item, f"{self.what}: each event")
            if event is not None and event in events:
                self.r.error(item, f"{self.what}: event {event!r} is listed twice")
            elif event is not None:
                events.append(event)
        if not node.value:
            self.r.error(node, f"{self.what}: event must name at least one event")
        # Partial on error: the rest is still checked (any error fails the whole file).
        return events or None

    def _target(self) -> tuple[str, dict[str, Any]] | None:
        kinds = [k for k in TARGET_KEYS if k in self.fields]
        if len(kinds) != 1:
            self.r.error(self.node, f"{self.what}: give exactly one of {', '.join(TARGET_KEYS)}")
            return None
        kind = kinds[0]
        node = self.fields[kind][1]
        what = f"{self.what}: {kind}"
        if kind == "log":
            if self.r.scalar(node, what, (bool,)) is not True:
                if plain_value(node) is False:
                    self.r.error(node, f"{what}: the only value is true")
                return None
            return kind, {}
        if kind == "handler":
            handler = self.r.text(node, what)
            return None if handler is None else (kind, {"handler": handler})
        target = self._webhook(node, what) if kind == "webhook" else self._action(node, what)
        return None if target is None else (kind, target)

    def _webhook(self, node: Node, what: str) -> dict[str, Any] | None:
        fields = self.r.mapping(node, what, WEBHOOK_KEYS)
        if fields is None:
            return None
        if "url" not in fields:
            self.r.error(node, f"{what}: url is required")
            return None
        url = self.r.text(fields["url"][1], f"{what}: url")
        if "secret_env" in fields:
            found = env_value(self.r, self.environ, fields["secret_env"][1], what, "secret_env")
            if found is None:
                return None
            self.secret = found[1]
        return None if url is None else {"url": url}

    def _action(self, node: Node, what: str) -> dict[str, Any] | None:
        fields = self.r.mapping(node, what, tuple(ACTION_KEYS))
        if fields is None:
            return None
        target: dict[str, Any] = {}
        for key, (_, value_node) in fields.items():
            value = self.r.scalar(value_node, f"{what}: {key}", ACTION_KEYS[key])
            if value is None:
                return None
            target[key] = str(value) if key == "room" else value
        return target

    def _check_specs(self, specs: list[SubscriptionSpec]) -> None:
        """The shared rules of :func:`tasks.subscribe.spec_errors`, each at its key's line."""
        reported: set[str] = set()
        for spec in specs:
            for key, message in _attributed(spec):
                if message not in reported:
                    reported.add(message)
                    node = self._value(key) or self._value("event") or self.node
                    self.r.error(node, f"{self.what}: {message}")


def _attributed(spec: SubscriptionSpec) -> list[tuple[str, str]]:
    """spec_errors(spec), each with the key it is about (for its line number)."""
    target = set(target_errors(spec.target_kind, spec.target))
    without_filter = set(spec_errors(replace(spec, filter=None)))
    found = []
    for message in spec_errors(spec):
        if message in target:
            key = spec.target_kind
        elif message not in without_filter:
            key = "filter"
        elif "backfill" in message:
            key = "backfill"
        elif "room" in message and spec.room is not None and not message.startswith("unknown"):
            key = "room"
        else:
            key = "event"
        found.append((key, message))
    return found
