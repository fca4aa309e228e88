"""Requests-per-minute and tokens-per-minute limits, enforced smoothly.

Requests are spaced evenly (a generic cell-rate algorithm, no bursts) instead of being sent in
bursts that draw 429s. A request's token cost is estimated before it is sent and corrected
from the response's usage. On a 429 every sender slows down and waits out ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time

# Aim a little under the configured rate: arrival times jitter at the server.
_HEADROOM = 0.98
_SLOWDOWN_ON_429 = 1.5
_MAX_SLOWDOWN = 8.0
_RECOVERY_PER_SUCCESS = 0.99


class RateLimiter:
    """Spaces requests so that neither ``rpm`` nor ``tpm`` is exceeded.

    :param rpm: requests per minute, or None for no limit.
    :param tpm: tokens per minute (prompt estimate plus answer), or None for no limit.
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None) -> None:
        if rpm is not None and rpm <= 0 or tpm is not None and tpm <= 0:
            raise ValueError("rpm and tpm must be positive")
        self.request_interval = 60.0 / (rpm * _HEADROOM) if rpm else 0.0
        self.seconds_per_token = 60.0 / (tpm * _HEADROOM) if tpm else 0.0
        self.slowdown = 1.0
        self._next = 0.0  # monotonic time before which nothing may be sent
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return bool(self.request_interval or self.seconds_per_token)

    async def acquire(self, tokens: int) -> None:
        """Wait until a request estimated at ``tokens`` tokens may be sent."""
        async with self._lock:  # FIFO: senders go out in the order they asked
            now = time.monotonic()
            start = max(now, self._next)
            if start > now:
                await asyncio.sleep(start - now)
            cost = max(self.request_interval, tokens * self.seconds_per_token)
            self._next = start + cost * self.slowdown

    def correct(self, estimated: int, actual: int) -> None:
        """Account for the tokens a response really used instead of the estimate."""
        if self.seconds_per_token:
            self._next += (actual - estimated) * self.seconds_per_token * self.slowdown

    def succeeded(self) -> None:
        """A request got through: creep back toward the configured rate."""
        self.slowdown = max(1.0, self.slowdown * _RECOVERY_PER_SUCCESS)

    def rate_limited(self, retry_after: float | None) -> None:
        """The server said 429: slow down for everyone, and wait out ``retry_after``."""
        self.slowdown = min(_MAX_SLOWDOWN, self.slowdown * _SLOWDOWN_ON_429)
        if retry_after:
            self._next = max(self._next, time.monotonic() + retry_after)
