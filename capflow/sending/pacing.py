"""Pacing: when the next request may leave, so that no rate limit is passed.

Three kinds of limit, the tightest of which wins at each moment:

- the caps the user set (``rpm``, ``tpm``): requests are spaced evenly, a generic cell-rate
  algorithm with no bursts; a request's tokens are estimated before it is sent and corrected
  from the answer's usage;
- the rate learned from the server's 429s (:class:`LearnedRate`), with no config at all;
- what the server's ``x-ratelimit-*`` headers say is left, where it sends them (OpenAI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from capflow.sending.learned_rate import LearnedRate
from capflow.serving.ratelimit_headers import RateLimitInfo

# Aim a little under a configured rate: arrival times jitter at the server.
_HEADROOM = 0.98
# Header-based pacing starts once less than this share of the server's window is left.
_HEADER_LOW = 0.2
_HEADER_TTL = 10.0  # seconds a header reading stays in force without a fresh one
_MAX_HOLD = 60.0  # the longest everyone waits on one "nothing left" answer (a 429 re-holds)


class Pacer:
    """Spaces requests so that neither ``rpm`` nor ``tpm`` nor the server's own limit is
    passed.

    :param rpm: requests per minute, or None for no cap.
    :param tpm: tokens per minute (prompt estimate plus answer), or None for no cap.
    :param learn: learn the server's rate from its 429s (the default).
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None,
                 learn: bool = True) -> None:
        if rpm is not None and rpm <= 0 or tpm is not None and tpm <= 0:
            raise ValueError("rpm and tpm must be positive")
        self.request_interval = 60.0 / (rpm * _HEADROOM) if rpm else 0.0
        self.seconds_per_token = 60.0 / (tpm * _HEADROOM) if tpm else 0.0
        self.learned = LearnedRate() if learn else None
        self._header_interval = 0.0
        self._header_seconds_per_token = 0.0
        self._header_until = 0.0  # monotonic time the header reading expires
        self._hold_until = 0.0  # the server said its window is empty until then
        self._next = 0.0  # monotonic time before which nothing may be sent
        self._lock = asyncio.Lock()
        self._stopped = asyncio.Event()

    @property
    def active(self) -> bool:
        """Whether anything limits the rate right now (else ``acquire`` may be skipped)."""
        return bool(self.request_interval or self.seconds_per_token
                    or (self.learned is not None and self.learned.limiting)
                    or self._header_until or self._hold_until)

    def stop(self) -> None:
        """The run is stopping: every sender waiting for its turn goes at once (to find that
        out)."""
        self._stopped.set()

    def rate(self) -> float | None:
        """The request rate (per second) being kept to now, or None when none is."""
        interval = self._interval(time.monotonic())
        return 1.0 / interval if interval else None

    def _interval(self, now: float) -> float:
        interval = self.request_interval
        if self.learned is not None and self.learned.limiting:
            interval = max(interval, self.learned.interval(now))
        if self._header_until:
            if now < self._header_until:
                interval = max(interval, self._header_interval)
            else:
                self._header_until = 0.0
                self._header_interval = self._header_seconds_per_token = 0.0
        return interval

    async def acquire(self, tokens: int) -> None:
        """Wait until a request estimated at ``tokens`` tokens may be sent."""
        async with self._lock:  # FIFO: senders go out in the order they asked
            now = time.monotonic()
            start = max(now, self._next, self._hold_until)
            if self._hold_until and now >= self._hold_until:
                self._hold_until = 0.0
            if start > now and not self._stopped.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), start - now)
            per_token = max(self.seconds_per_token, self._header_seconds_per_token)
            self._next = start + max(self._interval(start), tokens * per_token)

    def sent(self) -> None:
        """A request is going out (counted to learn the server's rate)."""
        if self.learned is not None:
            self.learned.sent(time.monotonic())

    def correct(self, estimated: int, actual: int) -> None:
        """Account for the tokens a response really used instead of the estimate."""
        per_token = max(self.seconds_per_token, self._header_seconds_per_token)
        if per_token:
            self._next += (actual - estimated) * per_token

    def succeeded(self, info: RateLimitInfo | None = None) -> None:
        """A request got through (``info``: its rate-limit headers, if any)."""
        now = time.monotonic()
        if self.learned is not None:
            self.learned.success(now)
        if info is not None:
            self._read_headers(info, now)

    def rate_limited(self, retry_after: float | None,
                     info: RateLimitInfo | None = None) -> None:
        """The server answered 429: learn from it. ``retry_after`` is honoured by the row that
        got it; everyone waits only when the headers say nothing is left until a reset."""
        now = time.monotonic()
        if self.learned is not None:
            self.learned.limited(now)
        if info is not None:
            self._read_headers(info, now)
            if info.remaining_requests == 0 or info.remaining_tokens == 0:
                waits = [w for w in (retry_after, info.reset_requests if
                                     info.remaining_requests == 0 else None,
                                     info.reset_tokens if info.remaining_tokens == 0 else None)
                         if w]
                if waits:
                    hold = min(min(waits), _MAX_HOLD)
                    self._hold_until = max(self._hold_until, now + hold)

    def _read_headers(self, info: RateLimitInfo, now: float) -> None:
        # A window being used up fast is refilled at (limit - remaining) / reset per second:
        # keep to that rate once little is left, so the server never has to say 429.
        interval = spt = 0.0
        if (info.limit_requests and info.remaining_requests is not None and info.reset_requests
                and info.remaining_requests < _HEADER_LOW * info.limit_requests):
            used = max(1, info.limit_requests - info.remaining_requests)
            interval = info.reset_requests / used / _HEADROOM
        if (info.limit_tokens and info.remaining_tokens is not None and info.reset_tokens
                and info.remaining_tokens < _HEADER_LOW * info.limit_tokens):
            used = max(1, info.limit_tokens - info.remaining_tokens)
            spt = info.reset_tokens / used / _HEADROOM
        if interval or spt:
            self._header_interval, self._header_seconds_per_token = interval, spt
            self._header_until = now + _HEADER_TTL
