"""Reading YAML as nodes, so that every value keeps its line and errors accumulate.

Used by the recipes loader (:mod:`worker.recipes_load`). Messages describe what a value is,
never what it holds: a misplaced value may be a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_TAG = "tag:yaml.org,2002:"


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1 if node.start_mark is not None else 0


class YamlReader:
    """One YAML file read as nodes, so that every value keeps its line; errors accumulate."""

    def __init__(self, path: str, key_hints: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.key_hints = dict(key_hints or {})  # unknown key -> what to say instead
        self.errors: list[tuple[str, int, str]] = []  # (path, line or 0, message)

    def error(self, at: Node | int, message: str) -> None:
        self.errors.append((self.path, at if isinstance(at, int) else line_of(at), message))

    def sorted_errors(self) -> list[str]:
        """``FILE:LINE: reason`` in file order; another file's (credentials) come first."""
        ordered = sorted(self.errors, key=lambda e: (e[0] == self.path, e[1]))
        return [
            f"{path}:{line}: {text}" if line else f"{path}: {text}" for path, line, text in ordered
        ]

    def compose(self) -> Node | None:
        try:
            text = Path(self.path).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.error(0, f"cannot read the file: {reason}")
            return None
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            problem = exc.problem or exc.context or "invalid YAML"
            self.error(line, f"invalid YAML: {problem}")
        except yaml.YAMLError as exc:
            self.error(0, f"invalid YAML: {type(exc).__name__}")
        return None

    def mapping(
        self, node: Node, what: str, allowed: tuple[str, ...] | None = None
    ) -> dict[str, tuple[Node, Node]] | None:
        """Key -> (key node, value node). Duplicate, non-text and unknown keys are errors."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping, not {describe(node)}")
            return None
        found: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, f"a key in {what}", (str, int))
            if key is None:
                continue
            key = str(key)
            if key in found:
                first = line_of(found[key][0])
                self.error(key_node, f"{what}: duplicate key {key!r} (first at line {first})")
                continue  # the first one counts
            if allowed is not None and key not in allowed:
                hint = self.key_hints.get(key) or f"expected one of {', '.join(allowed)}"
                self.error(key_node, f"{what}: unknown key {key!r}; {hint}")
                continue
            found[key] = (key_node, value_node)
        return found

    def scalar(self, node: Node, what: str, kinds: tuple[type, ...]) -> Any:
        """The plain value of ``node`` if it is one of ``kinds``; else None and an error."""
        value = plain_value(node)
        # bool is an int in Python; YAML true is no number here.
        wrong = isinstance(value, bool) and bool not in kinds
        if value is None or wrong or not isinstance(value, kinds):
            expected = " or ".join(_KIND_NAMES[k] for k in kinds)
            self.error(node, f"{what} must be {expected}, not {describe(node)}")
            return None
        return value

    def text(self, node: Node, what: str) -> str | None:
        value = self.scalar(node, what, (str,))
        return value if isinstance(value, str) else None


_KIND_NAMES = {str: "text", int: "a whole number", bool: "true or false", float: "a number"}


def plain_value(node: Node) -> Any:
    if not isinstance(node, ScalarNode) or not node.tag.startswith(_TAG):
        return None
    kind = node.tag.removeprefix(_TAG)
    if kind not in ("str", "int", "bool"):
        return None
    try:
        return yaml.constructor.SafeConstructor().construct_object(node)
    except yaml.YAMLError:
        return None


def describe(node: Node) -> str:
    """What a node is, in words; never its value (it may be a misplaced secret)."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    kind = node.tag.removeprefix(_TAG)
    return {
        "null": "empty",
        "bool": "true/false",
        "int": "a whole number",
        "float": "a number",
        "str": "text",
    }.get(kind, f"a {kind}")


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _TAG + "null"
