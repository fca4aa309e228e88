"""Retrying transient serving failures: bounded, with jittered backoff, honouring Retry-After."""

from __future__ import annotations

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

    max_attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 30.0
    max_time: float | None = 600.0

    def _wait(self) -> Callable[[RetryCallState], float]:
        backoff = wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError) and exc.retry_after is not None:
                return min(exc.retry_after, self.max_wait)
            return backoff(state)

        return wait

    async def call(
        self,
        fn: Callable[[A], Awaitable[T]],
        arg: A,
        on_retry: Callable[[ServingError], None],
    ) -> T:
        """Await ``fn(arg)``, retrying transient ``ServingError``s; the last error is raised."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ServingError):
                on_retry(exc)

        stop = stop_after_attempt(max(1, self.max_attempts))
        if self.max_time is not None:
            stop = stop | stop_after_delay(self.max_time)
        retrying = AsyncRetrying(
            stop=stop,
            wait=self._wait(),
            retry=retry_if_exception(lambda e: isinstance(e, ServingError) and e.transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        return await retrying(fn, arg)
