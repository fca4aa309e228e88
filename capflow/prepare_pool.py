"""Preparing rows in worker threads, off the event loop, a batch at a time.

Handing one row to a thread costs the event loop a future, a wake-up and a few callbacks:
about as much as preparing a small image does. Rows therefore go to the threads in batches
sized to hold a couple of milliseconds of work (one photo at a time, tens of small images),
from a running measure of how long a row takes. Few batches wait at once, so the loop never
queues thousands of rows for preparation ahead of sending the ones that are ready.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

R = TypeVar("R")
T = TypeVar("T")

BATCH_SECONDS = 0.002  # the work one batch should hold
MAX_BATCH = 32


def default_workers() -> int:
    """One thread per core, plus one: each spends part of a row holding the GIL or reading."""
    return (os.cpu_count() or 2) + 1


class PreparePool(Generic[R, T]):
    """Runs ``prepare`` over batches of rows in ``workers`` threads.

    Use as a context manager; ``await run(rows)`` returns, for each row, what ``prepare``
    returned or the exception it raised.
    """

    def __init__(self, prepare: Callable[[R], T], workers: int | None = None) -> None:
        self.prepare = prepare
        self.workers = workers or default_workers()
        self.seconds_per_row = 0.0  # a moving average; 0 until the first batch is done
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="capflow-prepare")
        self._queued = asyncio.Semaphore(self.workers * 2)  # batches waiting or in work

    def __enter__(self) -> PreparePool[R, T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def batch_size(self) -> int:
        """Rows for the next batch: about ``BATCH_SECONDS`` of work, one until measured."""
        if self.seconds_per_row <= 0:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / self.seconds_per_row)))

    async def reserve(self) -> None:
        """Wait until another batch may be queued (call before ``run``)."""
        await self._queued.acquire()

    async def run(self, rows: Sequence[R]) -> list[T | Exception]:
        """Prepare ``rows`` in a thread (after ``reserve``)."""
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._prepare_all, rows)
        finally:
            self._queued.release()

    def _prepare_all(self, rows: Sequence[R]) -> list[T | Exception]:
        began = time.perf_counter()
        results: list[T | Exception] = []
        for row in rows:
            try:
                results.append(self.prepare(row))
            except Exception as exc:  # the row's own failure, handled with the row
                results.append(exc)
        per_row = (time.perf_counter() - began) / max(1, len(rows))
        average = self.seconds_per_row  # a benign race: any thread's recent figure will do
        self.seconds_per_row = per_row if average <= 0 else 0.8 * average + 0.2 * per_row
        return results
