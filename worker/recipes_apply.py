"""Making the stored connections and subscriptions match a recipes file: :func:`apply`.

::

    load_recipes(FILE)       parse and check everything (worker.recipes_load); nothing touched
          |
    snapshot() + plan()      read what is stored; diff it with the file (worker.recipes_plan)
          |                  a dry run stops here: no HipChat call, no write
    look up new rooms        on connections that already exist, outside any transaction;
          |                  an unknown room stops everything before the first write
    one transaction          re-read, re-plan and apply; rooms on new connections are looked
                             up here, through the bucket of the id just given to them, and
                             an unknown room rolls the whole change back

Ownership: a subscription whose name starts with ``recipe:`` belongs to the file. It is
created, updated in place (target, filter, backfill, include_own: its priming state is kept),
re-created (connection, event or room changed: it primes again) or removed to match. Other
subscriptions are never touched, and connections the file does not name only go with
``prune_connections``.

Tokens and webhook secrets are compared decrypted and never appear in the returned lines, in
errors or in logs; the lines name what changed (``~ connection ops (token)``), never values.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from sqlalchemy.orm import Session

from storage import connections as conns
from storage import subscriptions as subs
from storage.errors import ValidationError
from storage.models import Subscription
from tasks.connections_api import start_budgets
from tasks.runtime import Runtime
from tasks.subscriptions_api import lookup_rooms, stored_target
from worker.recipes_load import load_recipes
from worker.recipes_model import RECIPE_PREFIX, Recipes, SubscriptionRecipe
from worker.recipes_plan import (
    ConnectionChange,
    Plan,
    StoredConnection,
    StoredSubscription,
    plan,
)

log = logging.getLogger(__name__)

# A secret that the current key cannot decrypt: equal to no secret the file can give.
_UNREADABLE = "\x00unreadable"

# (connection, room) -> (id, HipChat's name); None: not resolved yet (the first poll will)
RoomCache = dict[tuple[str, str], tuple[int, str] | None]


# -- what is stored ---------------------------------------------------------------------------
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
        include_own=bool(row.include_own),
        secret=None if encrypted is None else _decrypt(rt, str(encrypted)),
    )


def _decrypt(rt: Runtime, ciphertext: str) -> str:
    try:
        return rt.cipher.decrypt(ciphertext)
    except ValidationError:
        return _UNREADABLE  # the key changed: applying the file stores the value afresh


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
        removed = _execute(rt, s, recipes, final, rooms)
    for connection_id in removed:
        rt.budget.clear(connection_id)
    lines = final.lines()
    for line in lines:
        log.info("apply %s: %s", recipes.path, line)
    return lines


def _execute(
    rt: Runtime, s: Session, recipes: Recipes, the_plan: Plan, rooms: RoomCache
) -> list[int]:
    """Apply the plan in ``s``; the ids of the connections it removes."""
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
    removed = []
    for change in the_plan.connections:
        if change.recipe is None and change.stored is not None:
            conns.remove_connection(s, change.stored.id)
            removed.append(change.stored.id)
    return removed


def _apply_connection(rt: Runtime, s: Session, change: ConnectionChange) -> None:
    recipe = change.recipe
    assert recipe is not None
    if change.stored is None:
        row = conns.add_connection(
            s,
            recipe.name,
            recipe.base_url,
            recipe.token,
            rt.cipher,
            poll_interval_seconds=rt.settings.poll_interval_seconds,
        )
        s.flush()
        # Before the room lookups below, which call HipChat through this budget. Should the
        # transaction roll back, a started budget for an unused id is harmless.
        start_budgets(rt, [row.id])
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
    row.include_own = spec.include_own
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
        include_own=spec.include_own,
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
