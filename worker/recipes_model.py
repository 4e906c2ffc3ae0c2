"""What a recipes file asks for, once read and checked: :class:`Recipes`.

Built by :func:`worker.recipes_load.load_recipes`; compared with what is stored by
:mod:`worker.recipes_plan` and applied by :mod:`worker.recipes_apply`. Tokens and webhook
secrets are fields hidden from ``repr``, so that no log line or traceback shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.subscribe import SubscriptionSpec

RECIPE_PREFIX = "recipe:"  # ':' is refused in names people type, so these never collide


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
