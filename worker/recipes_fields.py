"""Rules shared by the readers of a recipes file and of its credentials file: names, keys
that would put a secret into the file, and values that name an environment variable.

Messages say where a secret should be, never what it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from yaml.nodes import Node

from storage.connections import validate_name
from storage.errors import ValidationError
from worker.yaml_reader import YamlReader

# Keys people reach for that would put a secret into a file meant for version control.
SECRET_KEYS = {
    "token": "tokens do not belong in the recipes file: use token_env or credentials",
    "api_key": "tokens do not belong in the recipes file: use token_env or credentials",
    "secret": "secrets do not belong in the recipes file: use secret_env",
}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot name a ``what`` (storage's rule), or None."""
    try:
        validate_name(name, what)
    except ValidationError as exc:
        return str(exc)
    return None


def env_value(
    reader: YamlReader,
    environ: Mapping[str, str],
    node: Node,
    what: str,
    key: str,
    *,
    strip: bool = False,
) -> tuple[str, str] | None:
    """(variable, value) of the environment variable that ``node``, the value of ``key``,
    names; None after recording why (not a variable name, not set or empty)."""
    var = reader.text(node, f"{what}: {key}")
    if var is None:
        return None
    if not _ENV_NAME.fullmatch(var):
        reader.error(node, f"{what}: {key} must name an environment variable")
        return None
    value = environ.get(var, "")
    if strip:
        value = value.strip()
    if not value:
        reader.error(node, f"{what}: environment variable {var} is not set")
        return None
    return var, value
