"""``hipchat-poller apply FILE``: make the stored connections and subscriptions match a file.

::

    load_recipes(FILE)       parse and check everything (worker.recipes_load); nothing touched
          |
    snapshot() + plan()      read what is stored and diff it against the file (pure)
          |                  a dry run stops here: no HipChat call, no write
    look up new rooms        on connections that already exist, outside any transaction;
          |                  an unknown room stops everything before the first write
    one transaction          re-read, re-plan and apply; rooms on new connections are looked
                             up here, through the bucket of the id just given to them, and
                             an unknown room rolls the whole change back

Ownership: a subscription whose name starts with ``recipe:`` belongs to the file. It is
created, updated in place (target, filter, backfill: its priming state is kept), re-created
(connection, event or room changed: it primes again) or removed to match. Other subscriptions
are never touched, and connections the file does not name only go with ``prune_connections``.

Tokens and webhook secrets are compared decrypted and never appear in the returned lines, in
errors or in logs; the lines name what changed (``~ connection ops (token)``), never values.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.models import Subscription
from tasks.runtime import Runtime
from tasks.subscriptions_api import lookup_rooms, stored_target
from worker.cli_connections import runtime
from worker.recipes_load import (
    RECIPE_PREFIX,
    ConnectionRecipe,
    Recipes,
    SubscriptionRecipe,
    load_recipes,
)

log = logging.getLogger(__name__)

# Changing one of these makes it another trigger: the old row goes, a new one primes afresh.
RECREATE_FIELDS = ("connection", "event", "room")
# A secret that the current key cannot decrypt: equal to no secret the file can give.
_UNREADABLE = "\x00unreadable"

# (connection, room) -> (id, HipChat's name); None: not resolved yet (the first poll will)
RoomCache = dict[tuple[str, str], tuple[int, str] | None]


# -- what is stored ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StoredConnection:
    id: int
    name: str
    base_url: str
    token: str = field(repr=False)  # _UNREADABLE if the current key cannot decrypt it


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


def snapshot(s: Session, rt: Runtime) -> tuple[list[StoredConnection], list[StoredSubscription]]:
    """Every connection, and every subscription the recipes own, detached from ``s``."""
    connections = [
        StoredConnection(row.id, row.name, row.base_url, _decrypt(rt, row.token_encrypted))
        for row in conns.list_connections(s)
    ]
    names = {c.id: c.name for c in connections}
    owned = [
        _stored_subscription(rt, row, names[row.connection_id])
        for row in subs.list_subscriptions(s)
        if row.name and row.name.startswith(RECIPE_PREFIX)
    ]
    return connections, owned


def _stored_subscription(rt: Runtime, row: Subscription, connection: str) -> StoredSubscription:
    target = dict(row.target or {})
    encrypted = target.pop("secret_encrypted", None)
    return StoredSubscription(
        id=row.id,
        connection=connection,
        name=str(row.name),
        event=row.event,
        room=row.room,
        room_id=row.room_id,
        filter=row.filter,
        target_kind=row.target_kind,
        target=target,
        backfill=row.backfill or 0,
        secret=None if encrypted is None else _decrypt(rt, str(encrypted)),
    )


def _decrypt(rt: Runtime, ciphertext: str) -> str:
    try:
        return rt.cipher.decrypt(ciphertext)
    except ValidationError:
        return _UNREADABLE  # the key changed: applying the file stores the value afresh


# -- the plan: a pure diff ----------------------------------------------------------------------
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
    }
    return tuple(f for f, changed in differs.items() if changed)


# -- applying ---------------------------------------------------------------------------------
def apply(
    rt: Runtime,
    path: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    prune_connections: bool = False,
) -> list[str]:
    """Make the database match the recipes file at ``path``; the changes, one line each.

    A bad file raises :class:`ValidationError` listing every problem as ``FILE:LINE: reason``
    and changes nothing. An empty list means the database already matched.
    """
    recipes = load_recipes(path)
    with rt.db.session() as s:
        stored_connections, stored_subscriptions = snapshot(s, rt)
    first = plan(
        recipes, stored_connections, stored_subscriptions, prune_connections=prune_connections
    )
    if dry_run:
        return first.lines()
    existing = {c.name: c.id for c in stored_connections}
    rooms: RoomCache = {}
    _raise_unknown(resolve_rooms(rt, recipes, first.creations(), existing, rooms))
    with rt.db.session() as s:
        final = plan(recipes, *snapshot(s, rt), prune_connections=prune_connections)
        _execute(rt, s, recipes, final, rooms)
    lines = final.lines()
    for line in lines:
        log.info("apply %s: %s", recipes.path, line)
    return lines


def _execute(rt: Runtime, s: Session, recipes: Recipes, the_plan: Plan, rooms: RoomCache) -> None:
    for change in the_plan.connections:
        if change.recipe is not None:
            _apply_connection(rt, s, change)
    for sub in the_plan.subscriptions:
        if sub.stored is not None and (sub.recipe is None or sub.recreate):
            subs.remove_subscription(s, sub.stored.id)
        elif sub.stored is not None and sub.recipe is not None:
            _update_subscription(rt, s, sub.stored.id, sub.recipe, sub.fields)
    s.flush()
    creations = the_plan.creations()
    ids = {c.name: c.id for c in conns.list_connections(s)}
    _raise_unknown(resolve_rooms(rt, recipes, creations, ids, rooms))
    for recipe in creations:
        room = rooms.get((recipe.spec.connection, recipe.spec.room or ""))
        _add_subscription(rt, s, recipe, ids[recipe.spec.connection], room)
    for change in the_plan.connections:
        if change.recipe is None and change.stored is not None:
            conns.remove_connection(s, change.stored.id)


def _apply_connection(rt: Runtime, s: Session, change: ConnectionChange) -> None:
    recipe = change.recipe
    assert recipe is not None
    if change.stored is None:
        conns.add_connection(
            s,
            recipe.name,
            recipe.base_url,
            recipe.token,
            rt.cipher,
            poll_interval_seconds=rt.settings.poll_interval_seconds,
        )
        s.flush()
        return
    conns.update_connection(
        s,
        change.stored.id,
        cipher=rt.cipher,
        base_url=recipe.base_url if "base_url" in change.fields else None,
        token=recipe.token if "token" in change.fields else None,
    )


def _update_subscription(
    rt: Runtime, s: Session, sub_id: int, recipe: SubscriptionRecipe, fields: Iterable[str]
) -> None:
    row = subs.get_subscription(s, sub_id)
    if row is None:  # cannot happen: read in this transaction
        raise ValidationError(f"subscription {sub_id} vanished during apply")
    spec = recipe.spec
    if "target" in fields:
        row.target_kind = spec.target_kind
        row.target = stored_target(rt, spec.target_kind, recipe.full_target())
    row.filter = spec.filter
    row.backfill = spec.backfill
    s.flush()


def _add_subscription(
    rt: Runtime,
    s: Session,
    recipe: SubscriptionRecipe,
    conn_id: int,
    room: tuple[int, str] | None,
) -> None:
    spec = recipe.spec
    row = subs.add_subscription(
        s,
        conn_id,
        spec.event,
        room=spec.room,
        filter=spec.filter,
        target_kind=spec.target_kind,
        target=stored_target(rt, spec.target_kind, recipe.full_target()),
        backfill=spec.backfill,
        name=recipe.stored_name,
    )
    s.flush()
    if room is not None:
        subs.set_room_id(s, row.id, *room)


# -- rooms ------------------------------------------------------------------------------------
def resolve_rooms(
    rt: Runtime,
    recipes: Recipes,
    creations: Sequence[SubscriptionRecipe],
    ids: dict[str, int],
    cache: RoomCache,
) -> list[str]:
    """Ask HipChat for the rooms of ``creations`` on the connections in ``ids`` that ``cache``
    does not know yet; fill ``cache``. Returns an error line for each unknown room."""
    wanted: dict[str, list[str]] = {}
    for recipe in creations:
        conn, room = recipe.spec.connection, recipe.spec.room
        if room is not None and conn in ids and (conn, room) not in cache:
            rooms = wanted.setdefault(conn, [])
            if room not in rooms:
                rooms.append(room)
    unknown: set[tuple[str, str]] = set()
    for conn, rooms in wanted.items():
        recipe_conn = recipes.connections[conn]
        found, missing = lookup_rooms(rt, ids[conn], recipe_conn.base_url, recipe_conn.token, rooms)
        cache.update({(conn, room): value for room, value in found.items()})
        unknown.update((conn, room) for room in missing)
    errors = {
        (r.room_line or r.line, r.display_name.split(":")[0], r.spec.room, r.spec.connection)
        for r in creations
        if (r.spec.connection, r.spec.room) in unknown
    }
    return [
        f"{recipes.where(line)}: subscription {name}: room {room!r} not found on connection {conn}"
        for line, name, room, conn in sorted(errors)
    ]


def _raise_unknown(errors: list[str]) -> None:
    if errors:
        raise ValidationError(f"{len(errors)} unknown room(s)", errors)


# -- command line -----------------------------------------------------------------------------
def register(sub: Any) -> None:
    """Add ``apply FILE [--dry-run] [--prune-connections]`` to the CLI's subparsers."""
    p = sub.add_parser("apply", help="make connections and subscriptions match a recipes file")
    p.add_argument("file", metavar="FILE", help="the recipes file (YAML, see docs/recipes.md)")
    p.add_argument(
        "--dry-run", action="store_true", help="show what would change; change and call nothing"
    )
    p.add_argument(
        "--prune-connections",
        action="store_true",
        help="also remove connections the file does not name, with their subscriptions",
    )
    p.set_defaults(handler=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    lines = apply(
        runtime(), args.file, dry_run=args.dry_run, prune_connections=args.prune_connections
    )
    for line in lines or ["no changes"]:
        print(line)
    if args.dry_run:
        print("dry run: nothing was changed")
    return 0
