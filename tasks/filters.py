"""Message filters: user-supplied regular expressions that cannot hang a worker.

Patterns run on RE2 (``google-re2``), whose matching time is linear in the text: there is no
backtracking, so ``(a+)+$`` costs the same as ``a``. The price is that RE2 refuses the
features that need backtracking, **backreferences** (``\\1``) and **lookaround**
(``(?=``, ``(?!``, ``(?<=``, ``(?<!``); such patterns are rejected with a
:class:`~storage.errors.ValidationError` when the subscription is saved, never at poll time.
Python's ``re`` is never used as a fallback.

Bounds by construction: a pattern is at most :data:`MAX_PATTERN_CHARS` characters (RE2
also refuses repetition counts over 1000 and programs over its memory budget), and only the
first :data:`MAX_TEXT_CHARS` characters of a message are searched (HipChat's own message
limit is 10,000 characters).

Semantics follow Factor's ``hipchat::message`` listener: ``re.search`` anywhere in the text,
``matches`` = the capture groups only. Differences from Python ``re`` worth telling users:
``\\w``, ``\\d``, ``\\s`` and ``\\b`` are ASCII-only in RE2 (use ``\\pL`` / ``\\p{L}`` for
letters in any script), and ``(?i)`` and friends work as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re2

from storage.errors import ValidationError

MAX_PATTERN_CHARS = 1000
MAX_TEXT_CHARS = 10_000

# RE2's error text is terse; these say what the user wrote that RE2 cannot do.
_BACKREF = "backreferences are not supported (RE2 does not backtrack)"
_LOOKAROUND = "lookaround is not supported (RE2 does not backtrack)"
_HINTS = (
    *((f"invalid escape sequence: \\{c}", _BACKREF) for c in "123456789k"),
    ("invalid perl operator: (?P", "named backreferences and recursion are not supported"),
    *((f"invalid perl operator: {op}", _LOOKAROUND) for op in ("(?=", "(?!", "(?<=", "(?<!")),
)


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would otherwise print every refused pattern to stderr
    return options


def _reason(exc: Exception) -> str:
    raw = exc.args[0] if exc.args else exc
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    hint = next((h for prefix, h in _HINTS if text.startswith(prefix)), None)
    return f"{text}; {hint}" if hint else text


def _refuse(pattern: str, reason: str) -> ValidationError:
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    return ValidationError(f"invalid filter {shown!r}: {reason}")


@dataclass(frozen=True)
class CompiledFilter:
    """A validated filter. Build it with :func:`compile_filter`."""

    pattern: str
    _regex: Any = field(repr=False, compare=False)

    def match(self, text: str) -> list[str] | None:
        """Capture groups of the first match in ``text`` (``[]`` for a pattern without
        groups, ``""`` for an optional group that took no part), or ``None``."""
        found = self._regex.search(text[:MAX_TEXT_CHARS])
        if found is None:
            return None
        return [group if group is not None else "" for group in found.groups()]


def compile_filter(pattern: str) -> CompiledFilter:
    """Compile a user's filter, or raise ``ValidationError`` naming the pattern and why."""
    if len(pattern) > MAX_PATTERN_CHARS:
        reason = f"longer than {MAX_PATTERN_CHARS} characters ({len(pattern)})"
        raise _refuse(pattern, reason)
    try:
        regex = re2.compile(pattern, _options())
    except re2.error as exc:
        raise _refuse(pattern, _reason(exc)) from exc
    return CompiledFilter(pattern, regex)
