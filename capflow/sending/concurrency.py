"""How many requests are in flight: adapted to the server's capacity, ``max_workers`` the
ceiling.

A server that queues requests behind a few slots (llama.cpp, a small vLLM) answers more slowly
the more requests wait; past a point every extra request only waits, and then times out. The
limit follows the approach of TCP Vegas and Netflix's gradient limiter: latency is the signal.

- Start: a small window (``INITIAL``), which grows by one request per answer while latency stays
  near its baseline (slow start: it doubles every round trip). A server failing every request
  therefore gets few of them. When no answer at all has come within ``OPEN_AFTER`` seconds and
  the request timeout is generous (``OPEN_TIMEOUT``), the window opens to the ceiling at once:
  a slow server would make learning cost more than it saves, and with such a timeout a queue
  at the server costs waiting, not requests.
- Baseline: the latency of an unloaded server, the lowest quartile of a few answers seen;
  answers are compared per completion token (plus a fixed part), so long and short answers
  compare.
- Each group of answers to requests sent at the current limit: when their median latency is
  more than ``TOLERANCE`` times the baseline, the limit shrinks in proportion; when it is
  within, and the limit was in use, it grows by a tenth.
- An overload answer (503, 529) of a request sent since the last decrease shrinks the limit by
  a quarter at once (those sent before it were judged already), and so does a timeout while
  latency is raised, or while a third of the latest requests timed out: a few timeouts among
  answers as fast as ever are requests that hung, not a server that is full.
- While latency stays raised, the baseline is probed every ``PROBE_EVERY`` seconds: one group at
  a quarter of the limit shows what an emptier server answers in.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

INITIAL = 16
OPEN_AFTER = 0.05  # seconds without any answer before the window opens to the ceiling ...
OPEN_TIMEOUT = 30.0  # ... when requests may take this long
TOLERANCE = 2.0  # latency may reach this multiple of the baseline before the limit shrinks
SHRINK_ON_DROP = 0.75
RAISED = 1.3  # latency above this multiple of the baseline: the server is queueing
TIMEOUT_SHARE = 0.3  # this share of the latest requests timing out: the server is full
PROBE_EVERY = 30.0
_TOKENS_OFFSET = 50  # a request's fixed cost (prompt, images), in completion-token units
# Latencies below this are the client's own scheduling as much as the server's: a fast server
# answering in 2 ms or in 5 ms is not queueing.
_LATENCY_FLOOR = 0.025
_BASE_GROUP = 8  # answers per baseline reading


class AdaptiveLimit:
    """Requests in flight, adapted to latency and timeouts.

    :param ceiling: the most in flight (``max_workers``).
    :param adaptive: adapt (the default); False keeps the limit at the ceiling.
    :param timeout: the requests' timeout in seconds, when known.
    """

    def __init__(self, ceiling: int, adaptive: bool = True, timeout: float | None = None
                 ) -> None:
        self.ceiling = max(1, int(ceiling))
        self.adaptive = adaptive
        self.limit = float(min(self.ceiling, INITIAL) if adaptive else self.ceiling)
        self.in_flight = 0
        self.lowest = float(self.ceiling)  # the lowest limit it shrank to, for the summary
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._warm = not adaptive or self.limit >= self.ceiling
        self._may_open = timeout is None or timeout >= OPEN_TIMEOUT
        self._slow_start = adaptive
        self._answered = False
        self._opener: asyncio.TimerHandle | None = None
        self.epoch = 0  # bumped at every change of the limit
        self._last_decrease = 0.0
        self._group: list[float] = []
        self._peak = 0  # most in flight during the current group
        self._base: float | None = None
        self._base_group: list[float] = []
        self._raised_since: float | None = None  # latency above baseline since then
        self._probing: float | None = None  # the limit to go back to after a probe
        self._ratio = 1.0  # the last group's median latency over the baseline
        self._recent: deque[bool] = deque(maxlen=30)  # the latest outcomes: timed out?

    def _can_start(self) -> bool:
        return self.in_flight < max(1, int(self.limit))

    async def acquire(self) -> int:
        """Wait for a place; returns the ticket to hand back to ``release``."""
        if not self._warm and self._opener is None and self._may_open:
            loop = asyncio.get_running_loop()
            self._opener = loop.call_later(OPEN_AFTER, self._open_if_silent)
        if self._waiters or not self._can_start():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter  # _wake counts the place as taken before it wakes us
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.in_flight -= 1  # a place was handed over: pass it on
                    self._wake()
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        else:
            self.in_flight += 1
        if self.in_flight > self._peak:
            self._peak = self.in_flight
        return self.epoch

    def _wake(self) -> None:
        while self._waiters and self._can_start():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _open_if_silent(self) -> None:
        if not self._answered and not self._warm:
            self._set(self.ceiling)
            self._slow_start = False
        self._warm = True

    def release(self, ticket: int, sent: float, outcome: str, tokens: int = 0) -> None:
        """Hand a place back. ``outcome``: ``ok`` (an answer), ``timeout``, ``overload`` (a
        503 or 529 answer), ``other`` (a failure that says nothing about capacity), or ``none``
        (nothing was sent)."""
        self.in_flight -= 1
        if self.adaptive and outcome != "none":
            self._answered = True
            now = time.monotonic()
            if outcome in ("ok", "timeout"):
                self._recent.append(outcome == "timeout")
            if outcome == "ok":
                latency = max(now - sent, _LATENCY_FLOOR)
                self._answer(ticket, latency / (tokens + _TOKENS_OFFSET), now)
            elif (outcome == "overload" or outcome == "timeout" and self._overloaded()) and (
                    sent >= self._last_decrease):
                self._decrease(self.limit * SHRINK_ON_DROP, now)
        self._wake()

    def _overloaded(self) -> bool:
        """Whether timeouts say the server is full: latency is raised, or a good part of the
        latest requests timed out (when the baseline itself was taken while it queued)."""
        recent = self._recent
        return self._ratio > RAISED or (
            len(recent) >= 10 and sum(recent) >= TIMEOUT_SHARE * len(recent))

    def _answer(self, ticket: int, latency: float, now: float) -> None:
        self._base_group.append(latency)
        if len(self._base_group) >= _BASE_GROUP:
            low = sorted(self._base_group)[_BASE_GROUP // 4]
            self._base = low if self._base is None else min(self._base, low)
            self._base_group = []
        if ticket != self.epoch:
            return  # sent at another limit: says nothing about this one
        if self._slow_start and (self._base is None or latency <= TOLERANCE * self._base):
            self._set(self.limit + 1, bump=False)  # one more per answer: doubles per round trip
            self._warm = True
        self._group.append(latency)
        if len(self._group) < max(4, min(16, int(self.limit) // 4)):
            return
        median, peak = _median(self._group), self._peak
        self._group, self._peak = [], self.in_flight
        if self._probing is not None:  # the probe's group: the baseline as it is now
            self._base, restore, self._probing = median, self._probing, None
            self._raised_since = None
            self._set(restore)
            return
        if self._base is None:
            return
        ratio = self._ratio = median / self._base
        if ratio > TOLERANCE:
            self._slow_start = False
            self._decrease(self.limit * max(0.5, TOLERANCE / ratio), now)
        elif peak >= int(self.limit) - 1 and not self._slow_start:
            self._set(self.limit + max(1.0, self.limit * 0.1))
        if ratio > RAISED:
            if self._raised_since is None:
                self._raised_since = now
            elif now - self._raised_since > PROBE_EVERY and self.limit >= 4:
                self._probing = self.limit
                self._set(self.limit / 4)
        else:
            self._raised_since = None

    def _decrease(self, limit: float, now: float) -> None:
        self._slow_start = False
        self._warm = True
        self._last_decrease = now
        self._set(limit)
        self.lowest = min(self.lowest, self.limit)

    def _set(self, limit: float, bump: bool = True) -> None:
        self.limit = min(float(self.ceiling), max(1.0, limit))
        if bump:
            self.epoch += 1
            self._group, self._peak = [], self.in_flight
        self._wake()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
