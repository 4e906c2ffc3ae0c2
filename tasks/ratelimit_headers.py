"""Reading HipChat's rate-limit headers (reference §5). Pure functions of headers and ``now``.

``X-Ratelimit-Reset`` is documented as an epoch in seconds, but real 429s carried ``"60"``:
a value below :data:`EPOCH_THRESHOLD` is taken as seconds from now. ``X-FloodControl-*`` is
the per-room send limit; HTTP headers ignore case, and ``requests`` headers do too.
"""

from __future__ import annotations

from collections.abc import Mapping
from email.utils import parsedate_to_datetime

from tasks.hipchat_types import RateLimitInfo

# 1e9 is 2001-09-09: no real reset epoch is below it, no sane "seconds to wait" above it.
EPOCH_THRESHOLD = 1e9
DEFAULT_RATE_LIMIT_WAIT_SECONDS = 60.0
# A reset epoch already in the past (clock skew) must not turn into a hot retry loop.
MIN_RATE_LIMIT_WAIT_SECONDS = 1.0

_LIMIT, _REMAINING, _RESET = "X-Ratelimit-Limit", "X-Ratelimit-Remaining", "X-Ratelimit-Reset"
_FLOOD_REMAINING, _FLOOD_RESET = "X-FloodControl-Remaining", "X-FloodControl-Reset"


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number == number and number >= 0 else None  # NaN and negatives: absent


def reset_epoch(value: float | None, now: float) -> float | None:
    """A reset header value as an epoch: below 1e9 it counts seconds from ``now``."""
    if value is None:
        return None
    return now + value if value < EPOCH_THRESHOLD else value


def parse_rate_limit(headers: Mapping[str, str], now: float) -> RateLimitInfo | None:
    """The ``X-Ratelimit-*`` headers as :class:`RateLimitInfo`, or ``None`` if there are none."""
    limit, remaining = _number(headers, _LIMIT), _number(headers, _REMAINING)
    reset = _number(headers, _RESET)
    if limit is None and remaining is None and reset is None:
        return None
    return RateLimitInfo(
        limit=None if limit is None else int(limit),
        remaining=None if remaining is None else int(remaining),
        reset_at=reset_epoch(reset, now),
    )


def _wait_until(value: float | None, now: float) -> float | None:
    epoch = reset_epoch(value, now)
    return None if epoch is None else max(MIN_RATE_LIMIT_WAIT_SECONDS, epoch - now)


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), or ``None``."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    seconds = _number(headers, "Retry-After")
    if seconds is not None:
        return seconds
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


def too_many_requests(headers: Mapping[str, str], now: float) -> tuple[float, bool]:
    """``(retry_after, flood_control)`` for a 429.

    Flood control is the cause when its ``Remaining`` is 0 and the API budget is not also
    spent; when both are spent the longer wait wins and it counts as the API limit.
    Without any reset header: ``Retry-After``, else 60 s.
    """
    api_spent = _number(headers, _REMAINING) == 0
    flood_spent = _number(headers, _FLOOD_REMAINING) == 0
    api_wait = _wait_until(_number(headers, _RESET), now)
    flood_wait = _wait_until(_number(headers, _FLOOD_RESET), now)
    if flood_wait is not None and (api_wait is None or (flood_spent and not api_spent)):
        return flood_wait, True
    if api_wait is not None:
        return max(api_wait, flood_wait if flood_wait is not None and flood_spent else 0.0), False
    fallback = retry_after_seconds(headers, now)
    return (DEFAULT_RATE_LIMIT_WAIT_SECONDS if fallback is None else fallback), False
