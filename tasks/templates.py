"""Safe message templates: a small subset of ``str.format`` over an event's JSON data.

Syntax::

    pong {matches[0]} from {item.message.from.name} in {item.room.name} ({event})
    literal braces: {{ and }}

A field is a name (a top-level key of the event) followed by steps: ``.key`` looks up a key
in an object, ``[n]`` an index in a list, ``[key]`` a key in an object (any text but
brackets, so ``[mention name]`` works). That is all a template can do:

* **Lookups only, on JSON data only.** Every step is a ``dict`` key or ``list`` index lookup
  on plain ``dict`` / ``list`` values; nothing ever calls ``getattr``, ``__format__`` or a
  method of an object, so ``{item.__class__}`` is just a key that does not exist.
* **No conversions and no format specs.** ``{x!r}`` and ``{x:>10}`` are refused when the
  template is compiled. Specs add nothing a chat message needs and can make rendering cost
  memory (``{x:>999999999}``).
* **Errors are loud.** Bad syntax is a :class:`~storage.errors.ValidationError` at compile time
  with the character position. A missing key, an index out of range or a lookup on a
  non-object at render time is a :class:`TemplateError` (also a ``ValidationError``) naming the
  field: rendering ``""`` would send a wrong message and hide the mistake, so the caller
  records the error on the subscription instead.

Rendering values: strings as they are; everything else as compact JSON (``42``, ``true``,
``null``, ``{"id": 1}``), so ``{item.room}`` shows the room object readably.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from storage.errors import ValidationError

MAX_TEMPLATE_CHARS = 10_000
MAX_RENDERED_CHARS = 100_000

# Our own fixed patterns (never user input); each alternative starts with a distinct
# character, so they cannot backtrack badly.
_LEXEME = re.compile(r"\{\{|\}\}|\{[^{}]*\}|\{|\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([^\[\]{}]+)\]")


class TemplateError(ValidationError):
    """A template could not be rendered with this event (missing key, bad index, ...)."""


class _Step(NamedTuple):
    key: str
    bracketed: bool

    def __str__(self) -> str:
        return f"[{self.key}]" if self.bracketed else f".{self.key}"


class _Field(NamedTuple):
    text: str
    position: int
    steps: tuple[_Step, ...]


@dataclass(frozen=True)
class Template:
    """A compiled template. Build it with :func:`compile_template`."""

    source: str
    parts: tuple[str | _Field, ...]


def _syntax_error(reason: str, position: int) -> ValidationError:
    return ValidationError(f"template error at position {position}: {reason}")


def _bad_step(char: str) -> str:
    if char == "!":
        return "conversions such as '!r' are not supported"
    if char == ":":
        return "format specs such as ':>10' are not supported"
    return f"unexpected {char!r} in a field; use .key, [index] or [key]"


def _parse_field(body: str, at: int) -> _Field:
    if not body:
        raise _syntax_error("empty field '{}'", at)
    head = _NAME.match(body)
    if head is None:
        raise _syntax_error("a field must start with a name, such as {message}", at + 1)
    steps = [_Step(head.group(), bracketed=False)]
    pos = head.end()
    while pos < len(body):
        step = _STEP.match(body, pos)
        if step is None:
            raise _syntax_error(_bad_step(body[pos]), at + 1 + pos)
        name, key = step.groups()
        steps.append(_Step(name if key is None else key, bracketed=key is not None))
        pos = step.end()
    return _Field("{" + body + "}", at, tuple(steps))


def _lexeme_part(lexeme: str, at: int) -> str | _Field:
    if lexeme in ("{{", "}}"):
        return lexeme[0]
    if lexeme == "{":
        raise _syntax_error("'{' is not closed (write '{{' for a literal brace)", at)
    if lexeme == "}":
        raise _syntax_error("single '}' (write '}}' for a literal brace)", at)
    return _parse_field(lexeme[1:-1], at)


def _join_literals(parts: list[str | _Field]) -> tuple[str | _Field, ...]:
    joined: list[str | _Field] = []
    for part in parts:
        if isinstance(part, str) and joined and isinstance(joined[-1], str):
            joined[-1] += part
        elif part != "":
            joined.append(part)
    return tuple(joined)


def compile_template(text: str) -> Template:
    """Parse and validate ``text``; raise ``ValidationError`` with the position if it is bad."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise ValidationError(f"template is longer than {MAX_TEMPLATE_CHARS} characters")
    parts: list[str | _Field] = []
    pos = 0
    for lexeme in _LEXEME.finditer(text):
        parts += [text[pos : lexeme.start()], _lexeme_part(lexeme.group(), lexeme.start())]
        pos = lexeme.end()
    parts.append(text[pos:])
    return Template(text, _join_literals(parts))


def validate_template(text: str) -> None:
    """Raise ``ValidationError`` if :func:`compile_template` would refuse ``text``."""
    compile_template(text)


class _Miss(Exception):
    """A lookup failed; the message says where and why. Becomes a TemplateError."""


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if type(value) in (int, float):
        return "a number"
    return names.get(type(value), "not JSON data")


def _lookup(value: Any, step: _Step, where: str) -> Any:
    # Exact type checks: only plain JSON containers are ever indexed, never an object that
    # could run code in __getitem__ or __getattr__.
    if type(value) is dict:
        if step.key not in value:
            raise _Miss(f"{where} has no key {step.key!r}")
        return value[step.key]
    if type(value) is list and step.bracketed and step.key.isdigit():
        if int(step.key) >= len(value):
            raise _Miss(f"{where} has {len(value)} items, no index {step.key}")
        return value[int(step.key)]
    raise _Miss(f"{where} is {_kind(value)}, so {step} cannot be looked up in it")


def _path(steps: tuple[_Step, ...]) -> str:
    return steps[0].key + "".join(str(step) for step in steps[1:]) if steps else "the event"


def _resolve(event: Mapping[str, Any], field: _Field) -> Any:
    value: Any = dict(event)
    for i, step in enumerate(field.steps):
        value = _lookup(value, step, _path(field.steps[:i]))
    return value


def _is_json(value: Any) -> bool:
    """Plain JSON all the way down (exact types, so no subclass hook can run in json.dumps)."""
    if type(value) is dict:
        return all(type(k) is str and _is_json(v) for k, v in value.items())
    if type(value) is list:
        return all(_is_json(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def _as_text(value: Any) -> str:
    if type(value) is str:
        return value
    if not _is_json(value):
        raise _Miss("the value is not JSON data")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise _Miss(f"the value is {_kind(value)}") from exc


def _render_field(event: Mapping[str, Any], field: _Field) -> str:
    try:
        return _as_text(_resolve(event, field))
    except _Miss as exc:
        where = f"template field {field.text} at position {field.position}"
        raise TemplateError(f"{where}: {exc}") from exc


def render(template: Template, event: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``event`` (an event payload, see :mod:`tasks.events`).

    Raises :class:`TemplateError` naming the field when a lookup fails, and when the result
    would exceed :data:`MAX_RENDERED_CHARS`.
    """
    out: list[str] = []
    size = 0
    for part in template.parts:
        text = part if isinstance(part, str) else _render_field(event, part)
        size += len(text)
        if size > MAX_RENDERED_CHARS:
            raise TemplateError(f"rendered text is longer than {MAX_RENDERED_CHARS} characters")
        out.append(text)
    return "".join(out)
