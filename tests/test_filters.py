"""Message filters on RE2: Factor's ``matches`` semantics, refusals, and linear time."""

from __future__ import annotations

import time

import pytest

from storage.errors import ValidationError
from tasks.filters import (
    MAX_PATTERN_CHARS,
    MAX_TEXT_CHARS,
    CompiledFilter,
    compile_filter,
)

MATCH_CASES = [
    pytest.param("ping (.*)", "ping foo", ["foo"], id="factor-ping-pong"),
    pytest.param("go (.*)", "go foo", ["foo"], id="factor-payload-example"),
    pytest.param("ping (.*)", "say ping pong", ["pong"], id="search-not-anchored"),
    pytest.param("^ping (.*)", "say ping pong", None, id="anchored-no-match"),
    pytest.param(r"deploy (\w+)(?: to (\w+))?", "deploy api", ["api", ""], id="optional-unmatched"),
    pytest.param(
        r"deploy (\w+)(?: to (\w+))?", "deploy api to prod", ["api", "prod"], id="optional"
    ),
    pytest.param("deploy", "please deploy now", [], id="no-groups"),
    pytest.param("deploy", "nothing here", None, id="no-match"),
    pytest.param("", "anything", [], id="empty-pattern-matches-all"),
    pytest.param("((a)(b))", "xaby", ["ab", "a", "b"], id="nested-groups"),
    pytest.param(r"(?P<who>\w+) joined", "bob joined", ["bob"], id="named-group"),
    pytest.param("(?i)PING (.*)", "ping Foo", ["Foo"], id="case-insensitive"),
    pytest.param(r"café (\p{L}+)", "café crème brûlée", ["crème"], id="unicode-letters"),
    pytest.param("(☃+)", "snow ☃☃ day", ["☃☃"], id="unicode-symbols"),
    pytest.param(r"(\w+)", "héllo", ["h"], id="re2-word-is-ascii"),
    pytest.param(r"^(\d+)$", "٣", None, id="re2-digit-is-ascii"),
    pytest.param("(?s)a(.)b", "a\nb", ["\n"], id="dotall-flag"),
    pytest.param("line2$", "line1\nline2\nline3", None, id="dollar-is-end-of-text"),
    pytest.param("(?m)^(line2)$", "line1\nline2\nline3", ["line2"], id="multiline-flag"),
]


@pytest.mark.parametrize(("pattern", "text", "expected"), MATCH_CASES)
def test_match(pattern: str, text: str, expected: list[str] | None) -> None:
    assert compile_filter(pattern).match(text) == expected


def test_only_the_first_max_text_chars_are_searched() -> None:
    needle = compile_filter("needle")
    assert needle.match("x" * (MAX_TEXT_CHARS - 6) + "needle") == []
    assert needle.match("x" * MAX_TEXT_CHARS + "needle") is None


REFUSED = [
    pytest.param(r"(a)\1", "backreferences", id="backreference"),
    pytest.param(r"(?P<n>a)(?P=n)", "backreferences", id="named-backreference"),
    pytest.param(r"(?<n>a)\k<n>", "backreferences", id="k-backreference"),
    pytest.param("foo(?=bar)", "lookaround", id="lookahead"),
    pytest.param("foo(?!bar)", "lookaround", id="negative-lookahead"),
    pytest.param("(?<=foo)bar", "lookaround", id="lookbehind"),
    pytest.param("(?<!foo)bar", "lookaround", id="negative-lookbehind"),
    pytest.param("ping (.*", "missing )", id="unbalanced-paren"),
    pytest.param("[z-a]", "invalid character class range", id="bad-range"),
    pytest.param("a{1001}", "invalid repetition size", id="repetition-over-1000"),
    pytest.param("x**", "bad repetition operator", id="double-star"),
    pytest.param("trailing\\", "trailing", id="trailing-backslash"),
    pytest.param("a" * (MAX_PATTERN_CHARS + 1), "longer than 1000 characters", id="too-long"),
]


@pytest.mark.parametrize(("pattern", "reason"), REFUSED)
def test_refused_patterns_name_the_pattern_and_the_reason(pattern: str, reason: str) -> None:
    with pytest.raises(ValidationError) as caught:
        compile_filter(pattern)
    message = str(caught.value)
    assert reason in message
    assert repr(pattern[:40])[:-1] in message
    assert caught.value.errors == [message]
    with pytest.raises(ValidationError):
        compile_filter(pattern)


def test_a_pattern_of_exactly_the_limit_is_accepted() -> None:
    compile_filter("a" * MAX_PATTERN_CHARS)


def test_compiled_filters_show_and_compare_by_pattern() -> None:
    assert repr(compile_filter("ping (.*)")) == "CompiledFilter(pattern='ping (.*)')"
    assert compile_filter("x") == compile_filter("x") != compile_filter("y")


def best_seconds(flt: CompiledFilter, text: str, repeat: int = 7) -> float:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        flt.match(text)
        timings.append(time.perf_counter() - start)
    return min(timings)


CATASTROPHIC = [
    pytest.param("(a+)+$", "a" * 40 + "b", id="nested-plus-40"),
    pytest.param("(x+x+)+y", "x" * 40, id="overlapping-plus-40"),
    pytest.param("(a|aa)+$", "a" * 40 + "b", id="alternation-40"),
    pytest.param("(a+)+$", "a" * (MAX_TEXT_CHARS - 1) + "b", id="nested-plus-10000"),
    pytest.param("(.*a){20}", "a" * 19 + "b" * 5000, id="counted-dot-star"),
]


@pytest.mark.parametrize(("pattern", "text"), CATASTROPHIC)
def test_catastrophic_patterns_run_in_linear_time(pattern: str, text: str) -> None:
    # With backtracking these take longer than the age of the universe; RE2 does not
    # backtrack. The bound is relative to a trivial scan of the same text on this machine.
    started = time.perf_counter()
    evil, trivial = compile_filter(pattern), compile_filter("z")
    assert evil.match(text) is None
    assert best_seconds(evil, text) < 100 * best_seconds(trivial, text)
    assert time.perf_counter() - started < 2.0
