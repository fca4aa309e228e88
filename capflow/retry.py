"""Retrying transient serving failures: bounded, with jittered backoff, honouring Retry-After."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from capflow.errors import ServingError

T = TypeVar("T")
A = TypeVar("A")


@dataclass
class RetryPolicy:
    """How failed requests are retried.

    :param max_attempts: tries per request, the first included.
    :param initial_wait: the backoff's first ceiling in seconds (doubling, with full jitter).
    :param max_wait: the longest wait between two tries, Retry-After included.
    :param max_time: the most seconds one row may spend on tries and waits; None: no bound.
    """

    max_attempts: int = 8
    initial_wait: float = 1.0
    max_wait: float = 30.0
    max_time: float | None = 600.0

    def _first_wait(self, exc: ServingError) -> float:
        if exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait)
        return random.uniform(0, min(self.initial_wait, self.max_wait))

    def _wait(self, began: float) -> Callable[[RetryCallState], float]:
        # The first wait (before tenacity takes over) is up to initial_wait; these double on.
        backoff = wait_random_exponential(multiplier=self.initial_wait * 2, max=self.max_wait)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError) and exc.retry_after is not None:
                seconds = min(exc.retry_after, self.max_wait)
            else:
                seconds = backoff(state)
            if self.max_time is not None:  # never sleep past the row's time bound
                seconds = min(seconds, max(0.0, self.max_time - (time.monotonic() - began)))
            return seconds

        return wait

    async def call(
        self,
        fn: Callable[[A], Awaitable[T]],
        arg: A,
        on_retry: Callable[[ServingError], None],
    ) -> T:
        """Await ``fn(arg)``, retrying transient ``ServingError``s; the last error is raised."""
        began = time.monotonic()
        try:
            # Most requests succeed at once: only a failed one pays for the retry machinery.
            return await fn(arg)
        except ServingError as exc:
            if not exc.transient or self.max_attempts <= 1:
                raise
            on_retry(exc)
            first_error = exc
        first_wait = self._first_wait(first_error)
        if self.max_time is not None:
            remaining = self.max_time - (time.monotonic() - began)
            if first_wait >= remaining:
                raise first_error  # no time left for another try
        await asyncio.sleep(first_wait)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError):
                on_retry(exc)

        stop = stop_after_attempt(self.max_attempts - 1)
        if self.max_time is not None:
            stop = stop | stop_after_delay(max(0.0, self.max_time - (time.monotonic() - began)))
        retrying = AsyncRetrying(
            stop=stop,
            wait=self._wait(began),
            retry=retry_if_exception(lambda e: isinstance(e, ServingError) and e.transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(fn, arg)
