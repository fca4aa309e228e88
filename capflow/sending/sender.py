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
        fields: dict[str, object] = {"in_flight": f"{self.limit.in_flight}/{int(self.limit.limit)}"}
        rate = self.pacer.rate()
        if rate:
            fields["pace"] = f"{rate:.1f}/s"
        if self.breaker.open:
            fields["outage"] = "probing"
        return fields

    def stopping(self, reason: str) -> None:
        """The run stops: wake every row held back."""
        self.breaker.stop(reason)

    async def send(self, request: Request, row: int) -> Response:
        """One try of ``request`` for row ``row``: its response, or a ``ServingError``."""
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
        outcome, sent, tokens = "other", time.monotonic(), 0
        try:
            if summary.stopped:
                raise Stopped
            if self.pacer.active:
                await self.pacer.acquire(request.estimated_tokens)
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
            self.pacer.sent()
            try:
                response = await self.serving.complete(request)
            except ServingError as exc:
                outcome = self._failed(exc, row, sent, probe)
                raise
            finally:
                self.reserved_tokens -= request.estimated_tokens
            outcome, tokens = "ok", self._succeeded(request, response, probe)
        finally:
            self.limit.release(ticket, sent, outcome, tokens)
        return response

    def _succeeded(self, request: Request, response: Response, probe: bool) -> int:
        """Learn from an answer and count its tokens; returns its completion tokens."""
        self.pacer.succeeded(response.rate_limits)
        self.breaker.succeeded(probe)
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
        elif exc.kind not in _NOT_OUTAGES:
            key = f"{exc.kind}:{exc.status}"
            if self.breaker.failed(key, str(exc), row, sent, probe):
                # The outage's failure, not the row's: its attempts are kept, and it waits.
                exc.counted = False  # type: ignore[attr-defined]
                exc.transient = True
            if self.breaker.stopped:
                self._stop(self.breaker.stopped)
        reason = self.rules.after_request(exc.kind, str(exc))
        if reason:
            self._stop(reason)
        if exc.kind == "Timeout":
            return "timeout"
        return "overload" if exc.status in _OVERLOAD_STATUS else "other"
