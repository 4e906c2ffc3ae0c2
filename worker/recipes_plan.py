"""What must change so that the stored connections and subscriptions match a recipes file:
a pure diff of plain values, no database, no HipChat.

:func:`plan` compares :class:`~worker.recipes_model.Recipes` with the stored rows as
:class:`StoredConnection` and :class:`StoredSubscription` (read by
:func:`worker.recipes_apply.snapshot`) and returns a :class:`Plan`, whose ``lines()`` are what
``apply`` prints. Lines name what changed (``~ connection ops (token)``), never a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.recipes_model import RECIPE_PREFIX, ConnectionRecipe, Recipes, SubscriptionRecipe

# Changing one of these makes it another trigger: the old row goes, a new one primes afresh.
RECREATE_FIELDS = ("connection", "event", "room")


# -- what is stored -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StoredConnection:
    id: int
    name: str
    base_url: str
    token: str = field(repr=False)  # a stand-in if the current key cannot decrypt it


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    id: int
    connection: str  # the connection's name
    name: str
    event: str
    room: str | None
    room_id: int | None
    filter: str | None
    target_kind: str
    target: dict[str, Any]  # without secret_encrypted
    backfill: int
    secret: str | None = field(default=None, repr=False)
    include_own: bool = False


# -- the changes ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ConnectionChange:
    stored: StoredConnection | None  # None: to create
    recipe: ConnectionRecipe | None  # None: to remove
    fields: tuple[str, ...] = ()

    def line(self) -> str:
        if self.stored is None:
            assert self.recipe is not None
            return f"+ connection {self.recipe.name}"
        if self.recipe is None:
            return f"- connection {self.stored.name} (with its subscriptions)"
        return f"~ connection {self.stored.name} ({', '.join(self.fields)})"


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    stored: StoredSubscription | None  # None: to create
    recipe: SubscriptionRecipe | None  # None: to remove
    fields: tuple[str, ...] = ()

    @property
    def recreate(self) -> bool:
        return any(f in RECREATE_FIELDS for f in self.fields)

    @property
    def creates(self) -> bool:
        return self.stored is None or self.recreate

    def line(self) -> str:
        if self.stored is None:
            assert self.recipe is not None
            return f"+ subscription {self.recipe.display_name}"
        name = self.stored.name.removeprefix(RECIPE_PREFIX)
        if self.recipe is None:
            return f"- subscription {name}"
        again = "; re-created" if self.recreate else ""
        return f"~ subscription {name} ({', '.join(self.fields)}{again})"


@dataclass(frozen=True, slots=True)
class Plan:
    connections: list[ConnectionChange]
    subscriptions: list[SubscriptionChange]

    def lines(self) -> list[str]:
        """Connections first, then subscriptions (removed, changed, new), pruning last."""
        kept = [c.line() for c in self.connections if c.recipe is not None]
        order = {"-": 0, "~": 1, "+": 2}
        changes = sorted((c.line() for c in self.subscriptions), key=lambda t: (order[t[0]], t))
        pruned = [c.line() for c in self.connections if c.recipe is None]
        return kept + changes + pruned

    def creations(self) -> list[SubscriptionRecipe]:
        return [c.recipe for c in self.subscriptions if c.creates and c.recipe is not None]


# -- the diff ---------------------------------------------------------------------------------
def plan(
    recipes: Recipes,
    connections: Sequence[StoredConnection],
    subscriptions: Sequence[StoredSubscription],
    *,
    prune_connections: bool = False,
) -> Plan:
    """What must change so that the stored state matches ``recipes``."""
    return Plan(
        _connection_changes(recipes, connections, prune_connections),
        _subscription_changes(recipes, subscriptions),
    )


def _connection_changes(
    recipes: Recipes, stored: Sequence[StoredConnection], prune: bool
) -> list[ConnectionChange]:
    by_name = {c.name: c for c in stored}
    changes = []
    for name, recipe in sorted(recipes.connections.items()):
        old = by_name.get(name)
        if old is None:
            changes.append(ConnectionChange(None, recipe))
            continue
        differs = {"base_url": old.base_url != recipe.base_url, "token": old.token != recipe.token}
        fields = tuple(f for f, changed in differs.items() if changed)
        if fields:
            changes.append(ConnectionChange(old, recipe, fields))
    if prune:
        gone = [c for c in stored if c.name not in recipes.connections]
        changes.extend(ConnectionChange(c, None) for c in sorted(gone, key=lambda c: c.name))
    return changes


def _subscription_changes(
    recipes: Recipes, stored: Sequence[StoredSubscription]
) -> list[SubscriptionChange]:
    wanted = {r.stored_name: r for r in recipes.subscriptions}
    by_name: dict[str, list[StoredSubscription]] = {}
    for old in stored:
        by_name.setdefault(old.name, []).append(old)
    changes: list[SubscriptionChange] = []
    for name, rows in sorted(by_name.items()):
        recipe = wanted.get(name)
        if recipe is None:
            changes.extend(SubscriptionChange(old, None) for old in rows)
            continue
        # The name is unique per connection only: keep the row on the wanted connection.
        rows.sort(key=lambda old: old.connection != recipe.spec.connection)
        changes.extend(SubscriptionChange(old, None) for old in rows[1:])
        fields = changed_fields(rows[0], recipe)
        if fields:
            changes.append(SubscriptionChange(rows[0], recipe, fields))
    changes.extend(SubscriptionChange(None, r) for n, r in wanted.items() if n not in by_name)
    return changes


def changed_fields(old: StoredSubscription, recipe: SubscriptionRecipe) -> tuple[str, ...]:
    spec = recipe.spec
    differs = {
        "connection": old.connection != spec.connection,
        "event": old.event != spec.event,
        # Stored as the file wrote it (a resolved room also has room_id), so equality is exact
        # on servers that match room names case-sensitively (HipChat) and on those that don't.
        "room": old.room != spec.room,
        "target": (old.target_kind, old.target, old.secret)
        != (spec.target_kind, spec.target, recipe.secret),
        "filter": old.filter != spec.filter,
        "backfill": old.backfill != spec.backfill,
        "include_own": old.include_own != spec.include_own,
    }
    return tuple(f for f, changed in differs.items() if changed)
