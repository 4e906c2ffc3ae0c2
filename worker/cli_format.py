"""What the commands print for people: aligned tables, ages, durations, and ``--since WHEN``.

Times are shown in UTC, to the second (``2026-11-29 10:04:05``), and ages in the largest
two units (``1h 02m``); JSON output keeps ISO 8601 instead (:func:`worker.cli_common.print_json`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
WHEN_HELP = "a duration ago (90s, 15m, 2h, 7d) or a UTC date/time (2026-11-29T10:00)"


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``--since WHEN``: a duration before ``now``, or an ISO date or time (UTC if it has no
    offset). Raises ``argparse.ArgumentTypeError`` (exit 2 through argparse)."""
    found = _DURATION.match(text.strip().lower())
    if found:
        seconds = float(found[1]) * _UNITS[found[2]]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {WHEN_HELP}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    port = int(text) if text.strip().isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number within 0..65535, not {text!r}")
    return port


def seconds_text(seconds: float) -> str:
    """``45s``, ``3m 05s``, ``2h 10m``, ``3d 04h``: the two largest units."""
    whole = round(abs(seconds))
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        text = f"{days}d {hours:02d}h"
    elif hours:
        text = f"{hours}h {minutes:02d}m"
    elif minutes:
        text = f"{minutes}m {secs:02d}s"
    else:
        text = f"{secs}s"
    return f"-{text}" if seconds < 0 else text


def ago(moment: datetime | None, now: datetime) -> str:
    """``3m 05s ago``, ``in 20s``, or ``never``."""
    if moment is None:
        return "never"
    delta = (now - moment).total_seconds()
    return f"{seconds_text(delta)} ago" if delta >= 0 else f"in {seconds_text(-delta)}"


def stamp(moment: datetime | None) -> str:
    """``2026-11-29 10:04:05`` in UTC, or ``-``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def one_line(text: str | None, width: int = 60) -> str:
    """A text on one line, cut to ``width`` characters with an ellipsis; ``-`` for none."""
    if not text:
        return "-"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns left-aligned and padded to their widest cell, two spaces apart; no trailing
    spaces. Numbers are right-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
