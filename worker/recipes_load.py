"""Reading a recipes file: YAML with line numbers, every problem reported at once.

:func:`load_recipes` turns the file described in ``docs/recipes.md`` into :class:`Recipes`, or
raises :class:`ValidationError` whose ``errors`` hold one ``FILE:LINE: reason`` per problem.
Nothing here touches the database or HipChat; :mod:`worker.recipes` compares and applies.

Secrets never live in the recipes file: a token comes from an environment variable or from a
separate credentials file (Factor's ``credentials.yml``), a webhook secret from an environment
variable. Messages say where a secret should be, never what it is, and YAML syntax errors are
reported without the source line PyYAML would quote, because that line may hold a token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yaml.nodes import Node, SequenceNode

from storage.connections import normalise_base_url, token_problem, validate_name
from storage.errors import ValidationError
from tasks.subscribe import SubscriptionSpec, spec_errors, target_errors
from worker.yaml_reader import YamlReader, describe, is_null, line_of, plain_value

RECIPE_PREFIX = "recipe:"  # ':' is refused in names people type, so these never collide
NAME_MAX_CHARS = 64  # the subscriptions.name column
DEFAULT_CREDENTIALS_KEY = "default"  # Factor's single form {hipchat: {api_key: ...}}

TOP_KEYS = ("credentials", "connections", "subscriptions")
CONNECTION_KEYS = ("base_url", "token_env", "credentials")
TARGET_KEYS = ("action", "webhook", "log", "handler")
SUBSCRIPTION_KEYS = ("name", "connection", "event", "room", "filter", "backfill", *TARGET_KEYS)
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
# Keys people reach for that would put a secret into a file meant for version control.
SECRET_KEYS = {
    "token": "tokens do not belong in the recipes file: use token_env or credentials",
    "api_key": "tokens do not belong in the recipes file: use token_env or credentials",
    "secret": "secrets do not belong in the recipes file: use secret_env",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True, slots=True)
class ConnectionRecipe:
    name: str
    base_url: str  # normalised as storage stores it
    line: int
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SubscriptionRecipe:
    """One stored subscription wanted by the file (a list of events gives several)."""

    stored_name: str  # recipe:<name> or recipe:<name>:<event>
    spec: SubscriptionSpec  # its target never holds the webhook secret: see full_target()
    line: int
    room_line: int | None = None
    secret: str | None = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        return self.stored_name.removeprefix(RECIPE_PREFIX)

    def full_target(self) -> dict[str, Any]:
        """The target as :func:`tasks.subscriptions_api.stored_target` expects it."""
        target = dict(self.spec.target)
        if self.secret is not None:
            target["secret"] = self.secret
        return target


@dataclass(frozen=True, slots=True)
class Recipes:
    path: str
    connections: dict[str, ConnectionRecipe]
    subscriptions: list[SubscriptionRecipe]

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def load_recipes(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Recipes:
    """Parse and check the whole file; ``environ`` defaults to ``os.environ`` (read now)."""
    reader = YamlReader(str(path), SECRET_KEYS)
    root = reader.compose()
    recipes = _Document(reader, os.environ if environ is None else environ).read(root)
    if reader.errors:
        errors = reader.sorted_errors()
        count = len(errors)
        raise ValidationError(f"{reader.path}: {count} problem{'s' if count > 1 else ''}", errors)
    assert recipes is not None  # no errors means every part was read
    return recipes


class _Document:
    """The recipes file's structure, read top-down; each part records its own errors."""

    def __init__(self, reader: YamlReader, environ: Mapping[str, str]) -> None:
        self.r = reader
        self.environ = environ
        self.credentials: _Credentials | None = None

    def read(self, root: Node | None) -> Recipes | None:
        if root is None:
            if not self.r.errors:
                self.r.error(1, "the file is empty")
            return None
        top = self.r.mapping(root, "the file", TOP_KEYS)
        if top is None:
            return None
        if "credentials" in top:
            self.credentials = _Credentials.load(self.r, top["credentials"][1])
        connections = self._connections(top.get("connections"))
        subscriptions = self._subscriptions(top.get("subscriptions"), connections)
        if self.r.errors:
            return None
        built = {name: c for name, c in connections.items() if c is not None}
        return Recipes(self.r.path, built, subscriptions)

    # -- connections ----------------------------------------------------------------------
    def _connections(self, entry: tuple[Node, Node] | None) -> dict[str, ConnectionRecipe | None]:
        if entry is None or is_null(entry[1]):
            return {}
        items = self.r.mapping(entry[1], "connections")
        found: dict[str, ConnectionRecipe | None] = {}
        for name, (key_node, value_node) in (items or {}).items():
            if not _valid_name(name, "connection"):
                self.r.error(key_node, _name_error(name, "connection"))
            found[name] = self._connection(name, value_node)
        return found

    def _connection(self, name: str, node: Node) -> ConnectionRecipe | None:
        what = f"connection {name}"
        fields = self.r.mapping(node, what, CONNECTION_KEYS)
        if fields is None:
            return None
        base_url = self._base_url(what, fields, node)
        sources = [k for k in ("token_env", "credentials") if k in fields]
        if len(sources) != 1:
            self.r.error(node, f"{what}: give exactly one of token_env or credentials")
            return None
        value_node = fields[sources[0]][1]
        if sources[0] == "token_env":
            token = self._token_from_env(what, value_node)
        else:
            token = self._token_from_credentials(what, value_node)
        if base_url is None or token is None:
            return None
        return ConnectionRecipe(name, base_url, line_of(node), token)

    def _base_url(self, what: str, fields: dict[str, tuple[Node, Node]], node: Node) -> str | None:
        if "base_url" not in fields:
            self.r.error(node, f"{what}: base_url is required")
            return None
        value_node = fields["base_url"][1]
        url = self.r.text(value_node, f"{what}: base_url")
        if url is None:
            return None
        try:
            return normalise_base_url(url)
        except ValidationError:
            # The URL is not echoed: a mistyped one may carry credentials in it.
            self.r.error(value_node, f"{what}: bad base_url, expected http(s)://host[/path]")
            return None

    def _token_from_env(self, what: str, node: Node) -> str | None:
        var = self.r.text(node, f"{what}: token_env")
        if var is None:
            return None
        if not _ENV_NAME.fullmatch(var):
            self.r.error(node, f"{what}: token_env must name an environment variable")
            return None
        token = self.environ.get(var, "").strip()
        if not token:
            self.r.error(node, f"{what}: environment variable {var} is not set")
            return None
        return self._checked_token(node, f"{what}: the token in ${var}", token)

    def _token_from_credentials(self, what: str, node: Node) -> str | None:
        key = self.r.scalar(node, f"{what}: credentials", (str, int))
        if key is None:
            return None
        if self.credentials is None:
            self.r.error(node, f"{what}: credentials needs `credentials: FILE` at the top")
            return None
        token = self.credentials.get(self.r, node, str(key), what)
        if token is None:
            return None
        return self._checked_token(node, f"{what}: the api_key {key!r} in the credentials", token)

    def _checked_token(self, node: Node, what: str, token: str) -> str | None:
        problem = token_problem(token)
        if problem is not None:
            self.r.error(node, f"{what} {problem}")
            return None
        return token

    # -- subscriptions ----------------------------------------------------------------------
    def _subscriptions(
        self, entry: tuple[Node, Node] | None, connections: Mapping[str, object]
    ) -> list[SubscriptionRecipe]:
        if entry is None or is_null(entry[1]):
            return []
        node = entry[1]
        if not isinstance(node, SequenceNode):
            self.r.error(node, f"subscriptions must be a list, not {describe(node)}")
            return []
        seen: dict[str, int] = {}
        found: list[SubscriptionRecipe] = []
        for index, item in enumerate(node.value, start=1):
            reader = _SubscriptionReader(self, item, index, connections)
            found.extend(reader.read(seen))
        return found


class _SubscriptionReader:
    """One item of ``subscriptions``: its keys, its target, and the shared spec checks."""

    def __init__(
        self, doc: _Document, node: Node, index: int, connections: Mapping[str, object]
    ) -> None:
        self.doc = doc
        self.r = doc.r
        self.node = node
        self.what = f"subscription #{index}"
        self.connections = connections
        self.fields: dict[str, tuple[Node, Node]] = {}
        self.secret: str | None = None

    def read(self, seen: dict[str, int]) -> list[SubscriptionRecipe]:
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
        if not _valid_name(name, "subscription"):
            self.r.error(node, _name_error(name, "subscription"))
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
            self.secret = self._secret(fields["secret_env"][1], what)
            if self.secret is None:
                return None
        return None if url is None else {"url": url}

    def _secret(self, node: Node, what: str) -> str | None:
        var = self.r.text(node, f"{what}: secret_env")
        if var is None:
            return None
        if not _ENV_NAME.fullmatch(var):
            self.r.error(node, f"{what}: secret_env must name an environment variable")
            return None
        secret = self.doc.environ.get(var, "")
        if not secret:
            self.r.error(node, f"{what}: environment variable {var} is not set")
            return None
        return secret

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


class _Credentials:
    """Factor's credentials file: ``hipchat: {api_key: ...}`` is the key "default";
    ``hipchat: {NAME: {api_key: ...}}`` names several. Other top-level keys are other tools'."""

    def __init__(self, path: str, tokens: dict[str, str] | None) -> None:
        self.path = path
        self.tokens = tokens  # None: unreadable, already reported

    @classmethod
    def load(cls, reader: YamlReader, node: Node) -> _Credentials:
        name = reader.text(node, "credentials")
        if name is None:
            return cls("", None)
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = Path(reader.path).parent / path
        own = YamlReader(str(path), SECRET_KEYS)
        root = own.compose()
        if root is None and not own.errors:
            own.error(1, "the credentials file is empty")
        tokens = None if root is None else cls._tokens(own, root)
        if own.errors:
            # Where the credentials file is wrong, then where the recipes file names it.
            reader.errors.extend(own.errors)
            reader.error(node, f"the credentials file {path} could not be used")
            return cls(str(path), None)
        return cls(str(path), tokens)

    @staticmethod
    def _tokens(reader: YamlReader, root: Node) -> dict[str, str]:
        top = reader.mapping(root, "the credentials file")
        if top is None:
            return {}
        if "hipchat" not in top:
            reader.error(root, "the credentials file has no hipchat section")
            return {}
        entries = reader.mapping(top["hipchat"][1], "hipchat") or {}
        tokens: dict[str, str] = {}
        for key, (_, value_node) in entries.items():
            if key == "api_key":
                token = reader.text(value_node, "hipchat: api_key")
                key = DEFAULT_CREDENTIALS_KEY
            else:
                fields = reader.mapping(value_node, f"hipchat: {key}", ("api_key",))
                if fields is None:
                    continue
                if "api_key" not in fields:
                    reader.error(value_node, f"hipchat: {key}: api_key is required")
                    continue
                token = reader.text(fields["api_key"][1], f"hipchat: {key}: api_key")
            if token is not None:
                tokens[key] = token.strip()
        return tokens

    def get(self, reader: YamlReader, node: Node, key: str, what: str) -> str | None:
        if self.tokens is None:
            return None  # unreadable: reported once, where the file is named
        if key not in self.tokens:
            known = ", ".join(sorted(self.tokens)) or "none"
            reader.error(
                node, f"{what}: no key {key!r} under hipchat in {self.path} (keys there: {known})"
            )
            return None
        if not self.tokens[key]:
            reader.error(node, f"{what}: the api_key of {key!r} in {self.path} is empty")
            return None
        return self.tokens[key]


def _valid_name(name: str, what: str) -> bool:
    try:
        validate_name(name, what)
    except ValidationError:
        return False
    return True


def _name_error(name: str, what: str) -> str:
    return f"bad {what} name {name!r}: use 1 to 64 of the characters A-Z a-z 0-9 _ . -"
