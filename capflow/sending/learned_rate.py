"""The server's request rate, learned from its 429s: no ``rpm`` to configure.

When the server refuses a good part of what is sent (``REFUSED``, over the last few seconds),
the rate it accepted meanwhile is the best measure of what it allows. Senders are then paced a
little above that rate (``PROBE``): far enough to notice when the server allows more, close
enough that few requests are refused. Occasional 429s (a server that refuses some requests at
random, or a burst) teach nothing: the rows that got them wait as they were told, and the pace
stays. While no 429 comes, the pace opens up again, and after a quiet minute it is dropped.
"""

from __future__ import annotations

import math

WINDOW = 5.0  # seconds of answers the accepted rate is measured over
_BUCKET = 0.1  # seconds per counting bucket
REFUSED = 0.2  # learn once 429s are more than this share of the requests sent lately ...
_MIN_SENT = 10  # ... and at least this many were sent
PROBE = 1.2  # pace at this multiple of the accepted rate
FLOOR = 0.2  # requests per second: never pace slower than this
_QUIET = 2.0  # seconds without a 429 before the pace opens up ...
_GROWTH = 1.25  # ... by this factor per further second
_FORGET = 60.0  # seconds without a 429 before the pace is dropped


class LearnedRate:
    """A request rate learned from 429s; ``limiting`` is False until the first one."""

    def __init__(self) -> None:
        n = int(WINDOW / _BUCKET)
        # Per bucket of time: requests sent, accepted, refused for the rate.
        self._sent, self._accepted, self._refused = [0] * n, [0] * n, [0] * n
        self._bucket_at = 0  # index (time / _BUCKET) of the newest bucket
        self._first: float | None = None  # time of the first answer seen
        self.rate: float | None = None  # requests per second, when limiting
        self._last_429 = 0.0
        self.refusals = 0

    @property
    def limiting(self) -> bool:
        """Whether a learned rate is in force."""
        return self.rate is not None

    def sent(self, now: float) -> None:
        """Count a request sent."""
        self._advance(now)
        self._sent[self._bucket_at % len(self._sent)] += 1

    def success(self, now: float) -> None:
        """Count an accepted request."""
        if self._first is None:
            self._first = now
        self._advance(now)
        self._accepted[self._bucket_at % len(self._accepted)] += 1

    def limited(self, now: float) -> None:
        """A 429 for the rate: when enough are refused, pace to what the server accepted."""
        if self._first is None:
            self._first = now
        self.refusals += 1
        self._advance(now)
        self._refused[self._bucket_at % len(self._refused)] += 1
        self._last_429 = now
        sent, refused = sum(self._sent), sum(self._refused)
        if sent < _MIN_SENT or refused <= REFUSED * sent:
            return
        span = min(WINDOW, max(1.0, now - self._first))
        self.rate = max(FLOOR, PROBE * sum(self._accepted) / span)

    def interval(self, now: float) -> float:
        """Seconds between two requests at the learned rate now (0 when not limiting)."""
        if self.rate is None:
            return 0.0
        quiet = now - self._last_429
        if quiet > _FORGET:
            self.rate = None
            return 0.0
        rate = self.rate
        if quiet > _QUIET:
            rate *= _GROWTH ** (quiet - _QUIET)
        return 1.0 / rate

    def _advance(self, now: float) -> None:
        at = math.floor(now / _BUCKET)
        gap = at - self._bucket_at
        if gap <= 0:
            return
        n = len(self._sent)
        for i in range(1, min(gap, n) + 1):
            slot = (self._bucket_at + i) % n
            self._sent[slot] = self._accepted[slot] = self._refused[slot] = 0
        self._bucket_at = at
