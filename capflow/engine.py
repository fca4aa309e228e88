"""The engine: rows stream from storage through an operator to storage.

Rows are prepared (images opened, checked, encoded) in a worker pool, at most ``max_workers``
requests are in flight, and every finished row is committed to the step's journal as it
finishes, so a crash loses at most the requests in flight. The step's output is written from
the journal, in input order, at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from capflow.errors import RowError, ServingError
from capflow.plugins import get_plugin_manager
from capflow.progress import Progress
from capflow.request import Request
from capflow.retry import RetryPolicy
from capflow.rows import Row
from capflow.run import RowResult, RunInfo, RunSummary
from capflow.storage.journal import RunJournal
from capflow.summary import format_summary

if TYPE_CHECKING:
    from capflow.operators.base import Operator
    from capflow.storage.base import Storage

ERROR_KEY = "_error"


@dataclass
class EngineSettings:
    """How the engine runs a step.

    :param retry: the retry policy for transient failures.
    :param prepare_workers: threads preparing rows (default: one per core).
    :param progress: show a progress bar on a terminal.
    :param report: print the summary when the step ends.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    prepare_workers: int | None = None
    progress: bool = True
    report: bool = True


def run_step(
    operator: Operator, storage: Storage, settings: EngineSettings, *, dry_run: bool = False
) -> RunSummary:
    """Run ``operator`` over every row of ``storage`` and return the summary."""
    summary = asyncio.run(_Step(operator, storage, settings, dry_run).run())
    if settings.report:
        print(format_summary(summary), flush=True)
    return summary


class _Step:
    def __init__(
        self, operator: Operator, storage: Storage, settings: EngineSettings, dry_run: bool
    ) -> None:
        self.op, self.storage, self.settings, self.dry_run = operator, storage, settings, dry_run
        self.serving = operator.serving
        self.hook = get_plugin_manager().hook
        self.summary = RunSummary(dry_run=dry_run, output=storage.output_name)
        self.pending: list[tuple[int, bool, str]] = []
        self.wake_writer = asyncio.Event()
        self.journal: RunJournal | None = None
        self.progress: Progress | None = None

    def fingerprint(self) -> str:
        what = [self.storage.input_identity(), self.op.describe(), self.serving.describe()]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    async def run(self) -> RunSummary:
        started = time.perf_counter()
        summary = self.summary
        total = self.storage.count()
        workers = max(1, int(self.serving.max_workers))
        if not self.dry_run:
            await self.serving.start()
            self.journal = RunJournal(self.storage.journal_path(), self.fingerprint())
            summary.journal = str(self.journal.path)
        self.hook.capflow_run_start(
            run=RunInfo(
                self.storage.input_name, self.storage.output_name, type(self.op).__name__,
                type(self.serving).__name__, total, self.dry_run,
            )
        )
        self.progress = Progress(total, enabled=self.settings.progress)
        queue: asyncio.Queue[tuple[Row, Request] | None] = asyncio.Queue(maxsize=workers)
        writer = asyncio.create_task(self.write_loop())
        senders = [asyncio.create_task(self.send_loop(queue)) for _ in range(workers)]
        try:
            await self.produce(queue)
            for _ in senders:
                await queue.put(None)
            await asyncio.gather(*senders)
        except asyncio.CancelledError:
            summary.stopped = "interrupted"
            for task in senders:
                task.cancel()
        finally:
            writer.cancel()
            self.flush()
            self.progress.close()
            if not self.dry_run:
                await self.serving.close()
            if self.journal is not None:
                self.storage.write(self.journal.lines())
                self.journal.close()
            summary.elapsed = time.perf_counter() - started
            self.hook.capflow_run_end(summary=summary)
        return summary

    async def produce(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        n_prep = self.settings.prepare_workers or os.cpu_count() or 2
        base_dir = self.storage.base_dir
        done = self.journal.done_indices() if self.journal else iter(())
        next_done = next(done, None)
        slots = asyncio.Semaphore(n_prep * 2)
        tasks: set[asyncio.Task] = set()

        async def prepare(row: Row) -> None:
            try:
                request = await loop.run_in_executor(pool, self.op.prepare, row, base_dir)
            except RowError as exc:
                self.finish(row, error=exc.record())
            except Exception as exc:  # a bug in an operator must not end the run
                self.finish(row, error=RowError(type(exc).__name__, str(exc)).record())
            else:
                await queue.put((row, request))
            finally:
                slots.release()

        with ThreadPoolExecutor(n_prep, thread_name_prefix="capflow-prepare") as pool:
            for row in self.storage.read():
                self.summary.rows += 1
                while next_done is not None and next_done < row.index:
                    next_done = next(done, None)
                if next_done == row.index:
                    self.summary.skipped += 1
                    self.progress.update(skipped=True)
                    continue
                if row.error:
                    self.finish(row, error=RowError("BadRow", row.error).record())
                    continue
                await slots.acquire()
                task = asyncio.create_task(prepare(row))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    async def send_loop(self, queue: asyncio.Queue) -> None:
        summary, policy = self.summary, self.settings.retry
        while (item := await queue.get()) is not None:
            row, request = item
            summary.images += request.image_count
            summary.image_bytes += request.image_bytes
            if self.dry_run:
                summary.example = summary.example or request.messages
                summary.requests += 1
                summary.done += 1
                self.progress.update()
                continue

            try:
                summary.requests += 1
                response = await policy.call(self.serving.complete, request, self.count_retry)
                fields = self.op.apply(row, response)
            except ServingError as exc:
                self.finish(row, error={"type": exc.kind, "message": str(exc), "stage": "request"})
                continue
            except Exception as exc:  # a bug in a serving or operator must not end the run
                error = {"type": type(exc).__name__, "message": str(exc), "stage": "request"}
                self.finish(row, error=error)
                continue
            summary.prompt_tokens += response.usage.prompt_tokens
            summary.completion_tokens += response.usage.completion_tokens
            self.finish(row, fields=fields)

    def count_retry(self, exc: ServingError) -> None:
        self.summary.retries += 1

    def finish(self, row: Row, *, fields: dict | None = None, error: dict | None = None) -> None:
        """Count a finished row and queue it for the next journal commit."""
        if error is not None:
            self.summary.failed += 1
            if len(self.summary.failures) < 20:
                self.summary.failures.append((row.index, error))
            line = row.with_fields({ERROR_KEY: error})
        else:
            self.summary.done += 1
            line = row.with_fields(fields or {})
        self.progress.update(failed=error is not None)
        if self.dry_run:
            return
        self.pending.append((row.index, error is None, line))
        self.wake_writer.set()
        self.hook.capflow_row_finished(result=RowResult(row.index, line, error))

    async def write_loop(self) -> None:
        # Group commit: rows finishing together share one transaction.
        while True:
            await self.wake_writer.wait()
            self.wake_writer.clear()
            self.flush()

    def flush(self) -> None:
        if self.pending and self.journal is not None:
            batch, self.pending = self.pending, []
            self.journal.add(batch)
