"""What a server's rate-limit headers say: ``Retry-After``, ``retry-after-ms`` and the
``x-ratelimit-*`` headers OpenAI (and gateways copying it) send with every answer.

The adaptive sender (``capflow.sending``) paces every request by them, so that capflow slows
down before the server has to refuse anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_MAX_WAIT = 24 * 3600.0  # a longer "wait" is a broken header, not advice


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """The ``x-ratelimit-*`` headers of one answer (None where absent).

    :param limit_requests: requests allowed per window (OpenAI: per minute).
    :param remaining_requests: requests left in the current window.
    :param reset_requests: seconds until the request window is full again.
    :param limit_tokens: tokens allowed per window.
    :param remaining_tokens: tokens left in the current window.
    :param reset_tokens: seconds until the token window is full again.
    """

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


def parse_duration(value: str | None) -> float | None:
    """Seconds in a duration such as ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s`` or ``0.5``."""
    if not value:
        return None
    value = value.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
            return None
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, _MAX_WAIT)


def retry_after(get: Callable[[str], str | None]) -> float | None:
    """Seconds the server asked to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds
    or an HTTP date); ``get`` looks a header up by its lower-case name."""
    ms = get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = None
        if value is not None and 0 <= value <= _MAX_WAIT:
            return value
    header = get("retry-after")
    if not header:
        return None
    header = header.strip()
    try:
        value = float(header)
    except ValueError:
        from email.utils import parsedate_to_datetime  # rare: most servers send seconds

        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        value = when.timestamp() - time.time()
    if value != value:
        return None
    return min(max(0.0, value), _MAX_WAIT)


def rate_limit_info(get: Callable[[str], str | None]) -> RateLimitInfo | None:
    """The ``x-ratelimit-*`` headers of an answer, or None when it has none."""
    limit_requests = _int(get("x-ratelimit-limit-requests"))
    remaining_requests = _int(get("x-ratelimit-remaining-requests"))
    limit_tokens = _int(get("x-ratelimit-limit-tokens"))
    remaining_tokens = _int(get("x-ratelimit-remaining-tokens"))
    if remaining_requests is None and remaining_tokens is None:
        return None
    return RateLimitInfo(
        limit_requests, remaining_requests, parse_duration(get("x-ratelimit-reset-requests")),
        limit_tokens, remaining_tokens, parse_duration(get("x-ratelimit-reset-tokens")),
    )


def _int(value: str | None) -> int | None:
    if not value:
        return None
    try:
        number = int(float(value.strip()))
    except (ValueError, OverflowError):
        return None
    return number if number >= 0 else None
