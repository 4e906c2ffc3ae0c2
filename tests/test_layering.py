"""Imports flow one way: worker -> tasks -> storage; the emulator stands apart.

Every ``import`` and ``from ... import`` of every product module is read (top level and inside
functions alike), so a shortcut taken anywhere fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project; anything else of ours is a layering error.
ALLOWED = {
    "storage": {"storage"},
    "tasks": {"tasks", "storage"},
    "worker": {"worker", "tasks", "storage", "emulator"},
    # The emulator is HipChat's stand-in and the tests' oracle: it shares no code with the
    # client it judges.
    "emulator": {"emulator"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    ours = set(ALLOWED)
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, imported in imported_packages(path):
            if imported in ours and imported not in ALLOWED[package]:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return problems


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    source = "import os\n\n\ndef f():\n    from tasks.budget import x\n    import worker.cli\n"
    bad.write_text(source)
    assert imported_packages(bad) == [(1, "os"), (5, "tasks"), (6, "worker")]
