"""Retrying transient serving failures: bounded, with jittered backoff, honouring Retry-After.

Not every failed try uses up one of a row's attempts: waiting out a rate limit (429) does not,
nor does a failure during an outage (the circuit breaker holds the row until the server is
back). Those are bounded by ``max_time`` alone.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from capflow.errors import ServingError

T = TypeVar("T")
A = TypeVar("A")

RATE_LIMITED = "RateLimited"


def counts_as_attempt(exc: ServingError) -> bool:
    """Whether a failed try uses up one of the row's attempts."""
    return exc.kind != RATE_LIMITED and exc.counted


@dataclass
class RetryPolicy:
    """How failed requests are retried.

    :param max_attempts: tries per request, the first included (waits for a rate limit or an
        outage are not counted).
    :param initial_wait: the backoff's first ceiling in seconds (doubling, with full jitter).
    :param max_wait: the longest backoff between two tries. A server's ``Retry-After`` is
        honoured as it is (with jitter, so that waiting rows do not return in lockstep).
    :param max_time: the most seconds one row may spend on tries and waits; None: no bound.
    """

    max_attempts: int = 8
    initial_wait: float = 1.0
    max_wait: float = 30.0
    max_time: float | None = 600.0

    def _seconds(self, exc: ServingError, attempts: int, rate_waits: int) -> float:
        if exc.retry_after is not None:
            # Spread the rows told to come back at one moment over a quarter of the wait.
            return exc.retry_after * random.uniform(1.0, 1.25) + random.uniform(0, 0.1)
        if exc.kind == RATE_LIMITED:
            ceiling = min(self.max_wait, self.initial_wait * 2 ** max(0, rate_waits - 1))
            return random.uniform(0.5, 1.0) * ceiling
        if not exc.counted:
            return random.uniform(0, 0.05)  # the circuit breaker does the waiting
        # Full jitter: up to initial_wait after the first failure, doubling after each.
        return random.uniform(0, min(self.max_wait, self.initial_wait * 2 ** max(0, attempts - 1)))

    async def call(
        self,
        fn: Callable[[A], Awaitable[T]],
        arg: A,
        on_retry: Callable[[ServingError], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> T:
        """Await ``fn(arg)``, retrying transient ``ServingError``s; the last error is raised.
        ``sleep`` waits between tries (the engine's returns early when the run stops)."""
        began = time.monotonic()
        try:
            # Most requests succeed at once: only a failed one pays for the retry machinery.
            return await fn(arg)
        except ServingError as exc:
            if not exc.transient:
                raise
            first_error = exc
        tally = [0, 0]  # attempts used up, rate-limit waits

        def remaining() -> float:
            if self.max_time is None:
                return float("inf")
            return self.max_time - (time.monotonic() - began)

        def count(exc: ServingError) -> None:
            tally[0] += counts_as_attempt(exc)
            tally[1] += exc.kind == RATE_LIMITED

        def after(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError):
                count(exc)

        def wait_for(exc: ServingError) -> float:
            return max(0.0, min(self._seconds(exc, tally[0], tally[1]), remaining()))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return wait_for(exc) if isinstance(exc, ServingError) else 0.0

        def stop(state: RetryCallState) -> bool:
            return tally[0] >= self.max_attempts or state.upcoming_sleep >= remaining()

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError):
                on_retry(exc)

        # The first failure is judged like the later ones, without tenacity's set-up cost.
        count(first_error)
        first_wait = wait_for(first_error)
        if tally[0] >= self.max_attempts or first_wait >= remaining():
            raise first_error
        on_retry(first_error)
        await sleep(first_wait)
        retrying = AsyncRetrying(
            stop=stop,
            wait=wait,
            retry=retry_if_exception(lambda e: isinstance(e, ServingError) and e.transient),
            after=after,
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )

        async def again(value: A) -> T:  # tenacity awaits only what it sees is a coroutine
            return await fn(value)

        return await retrying(again, arg)
