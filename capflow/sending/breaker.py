"""The circuit breaker: an outage or a permanent error stops the sending, not the rows.

When requests for different rows fail the same way one after another, and no answer came back
while they were out, the server is down or cannot do what is asked (a model without a vision
projector answers every image with the same 500). Sending more only burns requests and the
rows' retries. The breaker then opens: rows wait (their attempts are not used up) while one
probe request at a time goes out, with backoff; the first answer closes it and sending resumes.
When the same failure has lasted ``outage_s`` seconds, the run stops cleanly, naming the
server's message; the rows not finished are left for the next run.

Failures of requests sent before the last answer arrived do not count: a random 500 among
answers, or timeouts of requests that queued while others were answered, are not an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

SAME_ERROR_ROWS = 5  # rows failing with one error, in a row, open the breaker ...
ANY_ERROR_ROWS = 10  # ... or this many failing with errors of any kind
PROBE_FIRST = 1.0  # seconds before the first probe; doubling up to ...
PROBE_MAX = 10.0
# Before anything has been answered, a server that cannot be connected to at all is most
# likely the wrong address: stop after this many probes rather than wait out outage_s.
UNREACHABLE_PROBES = 3


class BreakerOpen(Exception):
    """The run must stop: the outage lasted too long (the message says why)."""


class CircuitBreaker:
    """Watches the failures of requests and stops sending during an outage.

    :param outage_s: how long one failure may last before the run stops.
    :param enabled: False: never open (every failure is the row's own).
    """

    def __init__(self, outage_s: float = 60.0, enabled: bool = True) -> None:
        self.outage_s = float(outage_s)
        self.enabled = enabled
        self.open = False
        self.opened = 0  # times it opened (for the summary)
        self.stopped: str | None = None
        self._last_success = 0.0
        self._ever_answered = False
        self._streak_key: str | None = None
        self._streak_rows: set[int] = set()
        self._any_rows: set[int] = set()
        self._streak_since = 0.0
        self._message = ""
        self._probe_out = False
        self._failed_probes = 0
        self._next_probe = 0.0
        self._changed = asyncio.Event()

    async def admit(self) -> bool:
        """Wait until a request may go: at once while closed (False), or as the next probe
        while open (True). Raises ``BreakerOpen`` once the run must stop."""
        while True:
            if self.stopped:
                raise BreakerOpen(self.stopped)
            if not self.open:
                return False
            now = time.monotonic()
            if not self._probe_out and now >= self._next_probe:
                self._probe_out = True
                return True
            self._changed.clear()
            # While a probe is out its outcome wakes us; look again now and then all the same.
            wait = PROBE_MAX if self._probe_out else self._next_probe - now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def succeeded(self, probe: bool) -> None:
        """An answer came back."""
        self._last_success = time.monotonic()
        self.answered(probe)

    def answered(self, probe: bool) -> None:
        """The server answered (an answer, or a refusal that is not an outage's, such as a
        429): it is there, so the sending resumes."""
        self._ever_answered = True
        self._streak_key, self._streak_rows, self._any_rows = None, set(), set()
        if probe:
            self._probe_out = False
        if self.open:
            self.open = False
            self._failed_probes = 0
            self._pulse()

    def probe_lost(self) -> None:
        """The probe went without a word on how it went (the run stopped, or the serving
        raised something unexpected): another may go when its time comes."""
        if self._probe_out:
            self._probe_out = False
            self._schedule_probe(time.monotonic())
            self._pulse()

    def failed(self, key: str, message: str, row: int, sent: float, probe: bool) -> bool:
        """A request failed with ``key`` (its kind and status). Returns True when the failure
        is the outage's (the row keeps its attempts), False when it is the row's own."""
        if not self.enabled:
            return False
        now = time.monotonic()
        if probe:
            self._probe_out = False
        if probe and self.open:
            self._failed_probes += 1
            self._message = message
            self._schedule_probe(now)
            self._check_deadline(now, key)
            self._pulse()
            return True
        if self.open:
            return True  # sent just before it opened: the same outage
        # (A probe that fails after an older request's answer closed the breaker is one more
        # failure among answers: judged below, like any other.)
        if sent < self._last_success:
            return False  # answers came back while it was out: not an outage
        if key != self._streak_key:
            self._streak_key, self._streak_rows = key, set()
        if not self._any_rows:
            self._streak_since = now  # the outage, if it is one, began here
        self._streak_rows.add(row)
        self._any_rows.add(row)
        self._message = message
        if len(self._streak_rows) >= SAME_ERROR_ROWS or len(self._any_rows) >= ANY_ERROR_ROWS:
            self.open = True
            self.opened += 1
            self._failed_probes = 0
            self._schedule_probe(now)
            self._pulse()
            return True
        return False

    def stop(self, reason: str) -> None:
        """Wake every waiting row: the run is stopping."""
        self.stopped = self.stopped or reason
        self._pulse()

    def _schedule_probe(self, now: float) -> None:
        wait = min(PROBE_MAX, PROBE_FIRST * 2 ** self._failed_probes)
        self._next_probe = now + wait * random.uniform(0.8, 1.2)

    def _check_deadline(self, now: float, key: str) -> None:
        lasted = now - self._streak_since
        if key.startswith("ConnectionError") and not self._ever_answered:
            if self._failed_probes >= UNREACHABLE_PROBES:
                self.stopped = (f"the server cannot be reached ({self._message}):"
                                " check api_url and that the server is running")
        elif lasted >= self.outage_s:
            self.stopped = (f"every request has failed for {lasted:.0f} s with {self._message}"
                            f" (stop.outage_s={self.outage_s:g})")
        elif self._next_probe - self._streak_since > self.outage_s:
            # No probe before the deadline: the last one waits for it, and decides.
            self._next_probe = self._streak_since + self.outage_s

    def _pulse(self) -> None:
        self._changed.set()
