"""The pool that prepares rows off the event loop: batches, failures, and its bound."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time

import pytest

from capflow.errors import RowError
from capflow.prepare_pool import MAX_BATCH, PreparePool


def _run(coro):
    return asyncio.run(coro)


def test_each_row_gets_its_result_or_its_own_exception():
    def prepare(n: int) -> int:
        if n == 2:
            raise RowError("ImageNotFound", "no such file")
        return n * 10

    async def main():
        with PreparePool(prepare, workers=2) as pool:
            await pool.reserve()
            return await pool.run([1, 2, 3])

    out = _run(main())
    assert out[0] == 10 and out[2] == 30
    assert isinstance(out[1], RowError) and out[1].kind == "ImageNotFound"


def test_rows_are_prepared_in_the_pools_threads():
    seen: set[str] = set()

    def prepare(n: int) -> int:
        seen.add(threading.current_thread().name)
        return n

    async def main():
        with PreparePool(prepare, workers=2) as pool:
            await pool.reserve()
            await pool.run([1, 2])

    _run(main())
    assert seen and all(name.startswith("capflow-prepare") for name in seen)


def test_batches_grow_for_quick_rows_and_stay_single_for_slow_ones():
    async def measure(seconds: float) -> tuple[int, int]:
        def prepare(n: int) -> int:
            if seconds:
                time.sleep(seconds)
            return n

        with PreparePool(prepare, workers=1) as pool:
            first = pool.batch_size()
            await pool.reserve()
            await pool.run(list(range(4)))
            return first, pool.batch_size()

    assert _run(measure(0.0)) == (1, MAX_BATCH)  # unmeasured: one row; then as many as allowed
    assert _run(measure(0.01)) == (1, 1)  # 10 ms a row is more than a batch should hold


def test_only_twice_as_many_batches_as_threads_wait_at_once():
    release = threading.Event()

    def prepare(n: int) -> int:
        release.wait(5)
        return n

    async def main() -> int:
        with PreparePool(prepare, workers=2) as pool:
            queued = []
            for n in range(4):
                await pool.reserve()
                queued.append(asyncio.create_task(pool.run([n])))
            blocked = asyncio.create_task(pool.reserve())
            await asyncio.sleep(0.2)
            was_blocked = not blocked.done()
            release.set()
            await asyncio.gather(*queued, blocked)
            return was_blocked

    assert _run(main())


@pytest.mark.parametrize("workers", [None, 3])
def test_the_number_of_threads(workers):
    import os

    with PreparePool(lambda n: n, workers=workers) as pool:
        assert pool.workers == (workers or (os.cpu_count() or 2) + 1)


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("capflow-prepare")]


def test_leaving_normally_ends_the_threads():
    async def main():
        with PreparePool(lambda n: n, workers=3) as pool:
            for n in range(3):
                await pool.reserve()
                await pool.run([n])
            assert _threads() and all(t.daemon for t in _threads())

    _run(main())
    assert _threads() == []


def test_a_cancelled_run_leaves_at_once_though_a_thread_is_stuck():
    # A thread stuck in a row (a download that hangs, a read on a hung file system) cannot
    # be interrupted: leaving the pool because of the cancellation must not wait for it, and
    # the batch queued behind it is dropped, not prepared.
    release = threading.Event()
    prepared: list[int] = []

    def prepare(n: int) -> int:
        prepared.append(n)
        release.wait(30)
        return n

    async def main() -> float:
        pool = PreparePool(prepare, workers=1)
        with contextlib.suppress(asyncio.CancelledError), pool:
            tasks = []
            for n in range(2):
                await pool.reserve()
                tasks.append(asyncio.create_task(pool.run([n])))
            await asyncio.sleep(0.2)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            began = time.perf_counter()
            raise asyncio.CancelledError  # as the engine's produce() does on SIGTERM
        return time.perf_counter() - began

    try:
        assert _run(main()) < 0.1
        assert [t.daemon for t in _threads()] == [True]  # abandoned, and no bar to exiting
    finally:
        release.set()
    time.sleep(0.2)
    assert prepared == [0] and _threads() == []


def test_the_interpreter_exits_though_a_pool_thread_is_stuck():
    # ThreadPoolExecutor's threads are joined at interpreter exit: a stuck one kept the
    # process alive until its download ended. The pool's own threads are not.
    code = """
import asyncio, time
from capflow.prepare_pool import PreparePool

async def main():
    with PreparePool(lambda n: time.sleep(600), workers=1) as pool:
        await pool.reserve()
        task = asyncio.create_task(pool.run([1]))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise RuntimeError("the run failed")

try:
    asyncio.run(main())
except RuntimeError:
    print("left the pool", flush=True)
"""
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert done.stdout == "left the pool\n", done.stderr
    assert time.monotonic() - began < 5
