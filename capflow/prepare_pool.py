"""Preparing rows in worker threads, off the event loop, a batch at a time.

Handing one row to a thread costs the event loop a future, a wake-up and a few callbacks:
about as much as preparing a small image does. Rows therefore go to the threads in batches
sized to hold a couple of milliseconds of work (one photo at a time, tens of small images),
from a running measure of how long a row takes. Few batches wait at once, so the loop never
queues thousands of rows for preparation ahead of sending the ones that are ready.

The threads are the pool's own daemon threads, not a ``ThreadPoolExecutor``'s: a thread stuck
on a download or on a read from a hung file system cannot be interrupted, and the executor's
threads are joined when it shuts down and again when the interpreter exits. When the run is
cancelled (Ctrl-C, SIGTERM) or fails, leaving the pool waits for none of its threads; a
stuck one is abandoned and ends with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

R = TypeVar("R")
T = TypeVar("T")

BATCH_SECONDS = 0.002  # the work one batch should hold
MAX_BATCH = 32

# A batch: the loop whose task awaits it, the future to settle there, and its rows.
_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[list]", Sequence]


def default_workers() -> int:
    """One thread per core, plus one: each spends part of a row holding the GIL or reading."""
    return (os.cpu_count() or 2) + 1


class PreparePool(Generic[R, T]):
    """Runs ``prepare`` over batches of rows in ``workers`` threads.

    Use as a context manager; ``await run(rows)`` returns, for each row, what ``prepare``
    returned or the exception it raised. Leaving the block normally waits for the (then idle)
    threads to end; leaving it on an exception (a cancelled run included) waits for none.
    """

    def __init__(self, prepare: Callable[[R], T], workers: int | None = None) -> None:
        self.prepare = prepare
        self.workers = workers or default_workers()
        self.seconds_per_row = 0.0  # a moving average; 0 until the first batch is done
        self._queued = asyncio.Semaphore(self.workers * 2)  # batches waiting or in work
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Semaphore(0)  # threads waiting for a batch
        self._closed = False

    def __enter__(self) -> PreparePool[R, T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(wait=exc_type is None)

    def close(self, wait: bool = True) -> None:
        """Stop the threads once their batch is done; batches not started are dropped (their
        ``run`` is cancelled). ``wait=False`` returns at once, whatever a thread is stuck on."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    _settle(job, None)
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

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
            if self._closed:
                raise RuntimeError("the preparation pool is closed")
            loop = asyncio.get_running_loop()
            future: asyncio.Future[list[T | Exception]] = loop.create_future()
            self._jobs.put((loop, future, rows))
            # A thread is started only when none is idle, as ThreadPoolExecutor does.
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"capflow-prepare_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            return await future
        finally:
            self._queued.release()

    def _work(self) -> None:
        """A worker thread: prepares batches until the pool closes."""
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            _, future, rows = job
            if not future.cancelled():  # a benign race: a cancelled batch is only wasted work
                try:
                    _settle(job, self._prepare_all(rows))
                except BaseException as exc:  # a bug in the pool: the awaiting task gets it
                    _settle(job, exc)
            self._idle.release()

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


def _settle(job: _Job, outcome: list[Any] | BaseException | None) -> None:
    """Hand a batch's outcome (a list, or a BaseException) to its future, on its loop; None
    cancels the future."""
    loop, future, _ = job

    def settle() -> None:
        if future.done():  # cancelled meanwhile: nobody waits for it
            return
        if outcome is None:
            future.cancel()
        elif isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for it
        loop.call_soon_threadsafe(settle)
