"""Reading a recipes file: YAML with line numbers, every problem reported at once.

:func:`load_recipes` turns the file described in ``docs/recipes.md`` into
:class:`~worker.recipes_model.Recipes`, or raises :class:`ValidationError` whose ``errors``
hold one ``FILE:LINE: reason`` per problem. Nothing here touches the database or HipChat.

::

    load_recipes         the document: its top-level keys and its connections (here)
      ├── Credentials    the credentials file it names   (worker.recipes_credentials)
      └── SubscriptionReader   each subscription        (worker.recipes_load_subscription)

Secrets never live in the recipes file: a token comes from an environment variable or from a
separate credentials file (Factor's ``credentials.yml``), a webhook secret from an environment
variable. Messages say where a secret should be, never what it is, and YAML syntax errors are
reported without the source line PyYAML would quote, because that line may hold a token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from yaml.nodes import Node, SequenceNode

from storage.connections import normalise_base_url, token_problem
from storage.errors import ValidationError
from worker.recipes_credentials import Credentials
from worker.recipes_fields import SECRET_KEYS, env_value, name_problem
from worker.recipes_load_subscription import SubscriptionReader
from worker.recipes_model import ConnectionRecipe, Recipes, SubscriptionRecipe
from worker.yaml_reader import YamlReader, describe, is_null, line_of

TOP_KEYS = ("credentials", "connections", "subscriptions")
CONNECTION_KEYS = ("base_url", "token_env", "credentials")


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
        self.credentials: Credentials | None = None

    def read(self, root: Node | None) -> Recipes | None:
        if root is None:
            if not self.r.errors:
                self.r.error(1, "the file is empty")
            return None
        top = self.r.mapping(root, "the file", TOP_KEYS)
        if top is None:
            return None
        if "credentials" in top:
            self.credentials = Credentials.load(self.r, top["credentials"][1])
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
            problem = name_problem(name, "connection")
            if problem is not None:
                self.r.error(key_node, problem)
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
        found = env_value(self.r, self.environ, node, what, "token_env", strip=True)
        if found is None:
            return None
        var, token = found
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
            reader = SubscriptionReader(self.r, self.environ, item, index, connections)
            found.extend(reader.read(seen))
        return found
