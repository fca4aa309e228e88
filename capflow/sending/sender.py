"""The sender: one try of one request, between the engine's rows and the serving.

Every try passes, in order: the circuit breaker (held during an outage), a place among the
requests in flight (the adaptive limit), the pacer (rate caps, learned and configured), and the
spending budgets. Its outcome then teaches each of them. Living in one place, this serves every
serving a plugin may bring.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from capflow.errors import ServingError
from capflow.request import Request, Response, Usage
from capflow.run import RunSummary
from capflow.sending.breaker import BreakerOpen, CircuitBreaker
from capflow.sending.concurrency import AdaptiveLimit
from capflow.sending.pacing import Pacer
from capflow.serving.base import Serving
from capflow.stop_rules import StopRules

# Failures the stop rules judge (a wrong key, model or address fails everything at once):
# they never hold rows back in the breaker.
_NOT_OUTAGES = {"RateLimited", "AuthenticationError", "PermissionDenied", "NotFound",
                "TLSError", "Redirected", "QuotaExceeded"}
_OVERLOAD_STATUS = {503, 529}
# With the circuit breaker off (adaptive=false): this many requests in a row that cannot
# connect stop the run (a busy run drops a few connections; a wrong address drops them all).
UNREACHABLE_AFTER = 20


class Stopped(Exception):
    """The run is stopping: the row is left for a later run."""


def estimate_tokens(text: str) -> int:
    """Tokens in ``text``, roughly (about four characters a token)."""
    return (len(text) + 3) // 4


class Sender:
    """Sends requests for the engine, adapting to the server.

    :param serving: who answers.
    :param summary: the run's counts (requests, tokens) are kept here.
    :param rules: the spending budgets and the stop rules.
    :param stop: called with a reason when the run must stop.
    :param rpm: requests per minute never to pass (None: no cap).
    :param tpm: tokens per minute never to pass (None: no cap).
    :param adaptive: adapt requests in flight and pace to the server, and hold rows back
        during an outage (else a fixed ``max_workers``, only the configured caps, and every
        request fails or succeeds on its own).
    :param outage_s: how long one failure of every request may last before the run stops.
    """

    def __init__(self, serving: Serving, summary: RunSummary, rules: StopRules,
                 stop: Callable[[str], None], *, rpm: float | None = None,
                 tpm: float | None = None, adaptive: bool = True, outage_s: float = 60.0
                 ) -> None:
        self.serving, self.summary, self.rules, self._stop = serving, summary, rules, stop
        timeout = getattr(serving, "timeout", None)
        self.limit = AdaptiveLimit(int(serving.max_workers), adaptive=adaptive,
                                   timeout=float(timeout) if timeout else None)
        self.pacer = Pacer(rpm, tpm, learn=adaptive)
        self.breaker = CircuitBreaker(outage_s, enabled=adaptive)
        self.reserved_tokens = 0  # estimated tokens of requests in flight (for budgets)
        self.rate_limited = 0  # 429s seen
        self._unreachable_streak = 0

    def _unreachable(self, exc: ServingError) -> str | None:
        """Without the breaker: a reason to stop once many requests in a row could not even
        connect (a wrong address), else None."""
        if exc.kind != "ConnectionError":
            self._unreachable_streak = 0
            return None
        self._unreachable_streak += 1
        if self._unreachable_streak < UNREACHABLE_AFTER:
            return None
        return (f"the server cannot be reached ({exc}): check api_url and that the server is"
                " running")

    def report(self, summary: RunSummary) -> None:
        """Put what the sending adapted to into ``summary``."""
        summary.max_workers = self.limit.ceiling
        summary.limit = int(self.limit.limit)
        summary.limit_lowest = int(self.limit.lowest)
        summary.rate_limited = self.rate_limited
        learned = self.pacer.learned
        summary.learned_rate = learned.rate if learned is not None else None
        summary.outages = self.breaker.opened

    def status(self) -> dict[str, object]:
        """The sending's state for the progress display."""
        fields: dict[str, object] = {"in_flight": self.limit.in_flight,
                                     "limit": f"{int(self.limit.limit)}/{self.limit.ceiling}"}
        rate = self.pacer.rate()
        if rate:
            fields["pace"] = f"{rate:.1f}/s"
        if self.breaker.open:
            fields["outage"] = "probing"
        return fields

    def stopping(self, reason: str) -> None:
        """The run stops: wake every row held back."""
        self.breaker.stop(reason)
        self.pacer.stop()

    async def send(self, request: Request, row: int,
                   on_sent: Callable[[float], None] | None = None) -> Response:
        """One try of ``request`` for row ``row``: its response, or a ``ServingError``.
        ``on_sent`` is told when the request goes out (after its wait for a place, the pace
        and the breaker)."""
        summary = self.summary
        while True:
            try:
                probe = await self.breaker.admit()
            except BreakerOpen:
                raise Stopped from None
            ticket = await self.limit.acquire()
            if probe or not self.breaker.open:
                break
            # The breaker opened while this row waited for its place: back to waiting.
            self.limit.release(ticket, time.monotonic(), "none")
        outcome, sent, tokens = "none", time.monotonic(), 0
        try:
            if summary.stopped:
                raise Stopped
            if self.pacer.active:
                await self.pacer.acquire(request.estimated_tokens)
                if summary.stopped:  # it stopped while this row waited for its turn
                    raise Stopped
            # Budgets count what is in flight too, so the last requests cannot overshoot them.
            reason = self.rules.before_request(
                summary.prompt_tokens, summary.completion_tokens,
                self.reserved_tokens + request.estimated_tokens,
            )
            if reason:
                self._stop(reason)
                raise Stopped
            summary.requests += 1
            self.reserved_tokens += request.estimated_tokens
            sent = time.monotonic()
            if on_sent is not None:
                on_sent(sent)
            self.pacer.sent()
            outcome = "other"
            try:
                response = await self.serving.complete(request)
            except ServingError as exc:
                outcome = self._failed(exc, row, sent, probe)
                probe = False  # the breaker has heard how it went
                raise
            finally:
                self.reserved_tokens -= request.estimated_tokens
            outcome, tokens = "ok", self._succeeded(request, response, probe)
            probe = False
        finally:
            self.limit.release(ticket, sent, outcome, tokens)
            if probe:  # stopped, cancelled, or a bug in the serving: the next probe may go
                self.breaker.probe_lost()
        return response

    def _succeeded(self, request: Request, response: Response, probe: bool) -> int:
        """Learn from an answer and count its tokens; returns its completion tokens."""
        self.pacer.succeeded(response.rate_limits)
        self.breaker.succeeded(probe)
        self._unreachable_streak = 0
        usage = response.usage
        if not (usage.prompt_tokens or usage.completion_tokens):
            # No usage from the server: estimate, so budgets and the summary still hold.
            usage = response.usage = Usage(request.estimated_tokens,
                                           estimate_tokens(response.text or ""))
            self.summary.estimated_usage += 1
        self.pacer.correct(request.estimated_tokens, usage.prompt_tokens + usage.completion_tokens)
        summary = self.summary
        summary.prompt_tokens += usage.prompt_tokens
        summary.completion_tokens += usage.completion_tokens
        self.rules.after_request(None)
        reason = self.rules.after_spend(summary.prompt_tokens, summary.completion_tokens)
        if reason:
            self._stop(reason)
        return usage.completion_tokens

    def _failed(self, exc: ServingError, row: int, sent: float, probe: bool) -> str:
        """Learn from a failure; returns what it says of the server's capacity."""
        if exc.kind == "RateLimited":
            self.rate_limited += 1
            self.pacer.rate_limited(exc.retry_after, exc.rate_limits)
        if exc.kind in _NOT_OUTAGES:
            # An answer, if not a welcome one: the server is there. (A wrong key or address
            # is the stop rules' to judge.)
            self.breaker.answered(probe)
        else:
            key = f"{exc.kind}:{exc.status}"
            # A failure of the row's own (a 400 for its image, say) counts toward an outage
            # (a model that takes no image answers every row so) but stays the row's error;
            # a transient one during an outage is the outage's: the row keeps its attempts
            # and waits for the server.
            if self.breaker.failed(key, str(exc), row, sent, probe) and exc.transient:
                exc.counted = False
            if self.breaker.stopped:
                self._stop(self.breaker.stopped)
        if not self.breaker.enabled:
            reason = self._unreachable(exc)
            if reason:
                self._stop(reason)
        reason = self.rules.after_request(exc.kind, str(exc))
        if reason:
            self._stop(reason)
        if exc.kind == "Timeout":
            return "timeout"
        return "overload" if exc.status in _OVERLOAD_STATUS else "other"
