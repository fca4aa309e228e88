"""The engine: rows stream from storage through an operator to storage.

Each row is prepared (images opened, checked, encoded) in a worker pool, answered from the
response cache or sent with at most ``max_workers`` requests in flight, and committed to the
step's journal as it finishes, so a crash loses at most the requests in flight. A request
waiting to be retried does not hold an in-flight slot, so retries go out promptly, between
first attempts. The step's output is written from the journal, in input order, at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import hashlib
import json
import logging
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capflow import manifest
from capflow.answers import AnswerError, check_answer
from capflow.cache import ResponseCache, request_key
from capflow.errors import CapflowError, ConfigError, RowError, ServingError
from capflow.manifest import RunContext
from capflow.observers import ObserverHooks
from capflow.plugins import get_plugin_manager
from capflow.prepare_pool import PreparePool
from capflow.progress import Progress
from capflow.redaction import clean_message
from capflow.request import Request, Response
from capflow.retry import RetryPolicy
from capflow.rows import Row
from capflow.run import RowResult, RunInfo, RunSummary
from capflow.sending import Sender, Stopped
from capflow.stop_rules import StopRules
from capflow.storage.file import check_output_path, write_atomically
from capflow.storage.journal import RunJournal
from capflow.storage.lock import RunLock
from capflow.summary import format_summary

if TYPE_CHECKING:
    from capflow.operators.base import Operator
    from capflow.storage.base import Storage

log = logging.getLogger(__name__)
# What a run's log file keeps (the CLI sends it there and nowhere else): summaries and errors.
record = logging.getLogger("capflow.record")
# Outputs this process has written (a run that wrote none leaves no trace: capflow.run_folder).
outputs_written: list[str] = []

ERROR_KEY = "_error"
_SHOWN_ESTIMATES = 10
_COMMIT_WINDOW = 0.02  # seconds: at most this much finished work waits for its commit


@dataclass
class EngineSettings:
    """How the engine runs a step.

    :param retry: the retry policy for transient failures.
    :param cache_path: the response cache's SQLite file; None switches the cache off.
    :param stop: when to stop early (failures, budgets).
    :param rpm: requests per minute to stay under (None: no limit).
    :param tpm: tokens per minute to stay under (None: no limit).
    :param retry_failed: on a rerun, send the rows that failed last time again.
    :param failed_output: also write the failed rows to this JSON Lines file.
    :param prepare_workers: threads preparing rows (default: one per core, plus one).
    :param progress: show a progress bar on a terminal (elsewhere, a line now and then).
    :param progress_interval: seconds between two progress lines when stderr is not a
        terminal.
    :param report: print the summary when the step ends.
    :param adaptive: adapt the requests in flight (``max_workers`` the ceiling) and the pace
        to the server: its latency, timeouts and 429s.
    :param outage_s: stop the run when every request has failed the same way this long.
    :param accept_truncated: keep answers cut off at the token limit as they are (else they
        are ``Truncated`` row errors).
    :param share_endpoints: the response cache and the journal leave the endpoint out of
        their keys, so endpoints serving one model share answers.
    :param run_context: the command line, config and plugins, for the run's manifest.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    cache_path: str | None = None
    stop: StopRules = field(default_factory=StopRules)
    rpm: float | None = None
    tpm: float | None = None
    retry_failed: bool = True
    failed_output: str | None = None
    prepare_workers: int | None = None
    progress: bool = True
    progress_interval: float = 10.0
    report: bool = True
    adaptive: bool = True
    outage_s: float = 60.0
    accept_truncated: bool = False
    share_endpoints: bool = False
    run_context: RunContext | None = None


def run_step(
    operator: Operator, storage: Storage, settings: EngineSettings, *, dry_run: bool = False
) -> RunSummary:
    """Run ``operator`` over every row of ``storage`` and return the summary."""
    summary = _run_loop(_Step(operator, storage, settings, dry_run).run())
    text = format_summary(summary)
    if settings.report:
        print(text, flush=True)
    record.info("%s", text)
    return summary


def _run_loop(coro: Any) -> Any:
    """Run ``coro`` to completion on uvloop where it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    uvloop.install()
    return asyncio.run(coro)


class _Step:
    def __init__(
        self, operator: Operator, storage: Storage, settings: EngineSettings, dry_run: bool
    ) -> None:
        self.op, self.storage, self.settings, self.dry_run = operator, storage, settings, dry_run
        self.serving = operator.serving
        self.hook = ObserverHooks(get_plugin_manager())
        self.summary = RunSummary(dry_run=dry_run, output=storage.output_name)
        self.pending: list[tuple[int, bool, str]] = []
        self.wake_writer = asyncio.Event()
        self.journal: RunJournal | None = None
        self.cache: ResponseCache | None = None
        self.rules = settings.stop
        self.sender = Sender(self.serving, self.summary, self.rules, self.stop,
                             rpm=settings.rpm, tpm=settings.tpm,
                             # A batch's answers take hours: no latency to adapt to.
                             adaptive=settings.adaptive and not getattr(
                                 self.serving, "batched", False),
                             outage_s=settings.outage_s)
        self.progress = Progress(None, enabled=False)
        self.started = False
        self.stopping = asyncio.Event()  # set once the run stops: waits end early
        self.serving_key: dict[str, Any] = {}
        self.tasks: set[asyncio.Task] = set()
        self.started_at = datetime.datetime.now().astimezone()
        self.example_index = -1  # the row whose request a dry run shows
        self.failed_types: Counter[str] = Counter()  # this run's failed rows by error type
        self.output_failures: dict[str, int] = {}  # the output's, from the journal
        self.active = asyncio.Semaphore(1)  # rows in progress, sized in produce()
        self.began = time.perf_counter()
        self.output_spent: dict[str, float] = {}  # what building the output cost, all runs
        self.committed_spent: dict[str, float] = {}  # what this run's commits have counted
        self.taken: dict[int, float] = {}  # rows in progress: when each was taken in

    def fingerprint(self) -> str:
        what = [self.storage.input_identity(), self.op.describe(), self.serving_key]
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def stop(self, reason: str) -> None:
        if self.summary.stopped is None:
            self.summary.stopped = clean_message(reason)
            self.sender.stopping(self.summary.stopped)
            self.stopping.set()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` between two tries of a row, or until the run stops."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def run(self) -> RunSummary:
        began = self.began = time.perf_counter()
        # Before anything is sent (the serving's start may ask the server for its model):
        # the input and output are checked, and the output is this run's alone.
        self.storage.check()
        if self.settings.failed_output and not self.dry_run:
            check_output_path(self.settings.failed_output, "failed_output")
        made = _missing_folders(self.storage.journal_path().parent)
        lock = None if self.dry_run else RunLock(self.storage.journal_path()).acquire()
        try:
            if not self.dry_run:
                # Started before the stores: the model it resolves belongs in every cache key
                # and fingerprint.
                await self.serving.start()
                self.started = True
            try:
                self.open_stores(lock)
                await self.run_rows()
            finally:
                if self.started:
                    await self.serving.close()
                self.close_stores()
        finally:
            if lock is not None and self.journal is None:
                lock.release()  # the journal, once open, releases it when it closes
            if self.journal is None:  # nothing ran: the folders made for the output go too
                for folder in made:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        summary = self.summary
        if summary.total is None and summary.stopped is None:
            summary.total = summary.rows  # the whole input was read
        live = self.rules.cost(summary.prompt_tokens, summary.completion_tokens)
        # A batch serving's answers cost a fraction of live ones (half, on OpenAI's Batch API).
        summary.cost = live * float(getattr(self.serving, "price_factor", 1.0))
        summary.saved = live - summary.cost
        summary.elapsed = time.perf_counter() - began
        self.sender.report(summary)
        if self.journal is not None:
            self.write_manifest()
        self.hook.capflow_run_end(summary=summary)
        return summary

    def open_stores(self, lock: RunLock | None = None) -> None:
        """Open the response cache and the run journal (a clear error when they cannot be)."""
        self.serving_key = dict(self.serving.describe())
        if self.settings.share_endpoints:
            self.serving_key.pop("endpoint", None)
        cache_path = self.settings.cache_path
        try:
            # A dry run reads an existing cache (to say what it would answer) but creates none.
            if cache_path and (not self.dry_run or Path(cache_path).exists()):
                self.cache = ResponseCache(Path(cache_path))
            if not self.dry_run:
                self.journal = RunJournal(self.storage.journal_path(), self.fingerprint(),
                                          lock=lock)
                self.summary.journal = str(self.journal.path)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the response cache or the run journal: {exc}"
                              f" (cache.path={cache_path}, output={self.storage.output_name})"
                              ) from None

    def close_stores(self) -> None:
        """Write the step's output from the journal and close both stores. A store that cannot
        be written (a full disk) stops the run with a one-line reason, after the summary."""
        summary = self.summary
        try:
            self.flush()
        except sqlite3.Error as exc:
            self.stop(_store_failure(exc, self.journal))
        if self.cache is not None:
            summary.cache_hits = self.cache.hits
            with contextlib.suppress(sqlite3.Error):
                summary.cache_size = self.cache.size()
            with contextlib.suppress(sqlite3.Error):
                self.cache.close()
        if self.journal is not None:
            summary.output_ok, summary.output_failed = self.journal.counts()
            with contextlib.suppress(sqlite3.Error):  # a figure for the record, not a row
                self.output_spent = self.journal.spent()
            try:
                self.output_failures = manifest.failed_by_type(self.journal.failed_lines())
                self.storage.write(_JournalRows(self.journal, self.storage.rows_as))
                self.write_failed()
            except CapflowError as exc:
                self.stop(str(exc))
            except OSError as exc:  # a storage of a plugin's, say
                self.stop(f"cannot write {self.storage.output_name}: {exc.strerror or exc};"
                          f" the finished rows are kept in {self.journal.path}: run the same"
                          " command again once that is fixed")
            finally:
                self.journal.close()

    async def run_rows(self) -> None:
        settings = self.settings
        # Counting a JSON array means parsing it: only worth it for a progress bar on screen.
        total = self.storage.count(cheap_only=not Progress.shown(settings.progress))
        self.summary.total = total
        self.hook.capflow_run_start(
            run=RunInfo(
                self.storage.input_name, self.storage.output_name, type(self.op).__name__,
                type(self.serving).__name__, total, self.dry_run,
                dict(settings.run_context.config) if settings.run_context else {},
            )
        )
        self.progress = Progress(total, enabled=settings.progress,
                                 interval=settings.progress_interval, status=self.status)
        writer = asyncio.create_task(self.write_loop())
        ticker = asyncio.create_task(self.progress.tick())
        main = asyncio.current_task()
        assert main is not None  # run_rows runs as a task
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
        try:
            await self.produce()
        except asyncio.CancelledError:
            self.stop("interrupted")
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGTERM)
            writer.cancel()
            ticker.cancel()
            self.progress.close()

    def status(self) -> dict[str, object]:
        """Tokens, cost and the sending's state, for the progress display."""
        s = self.summary
        fields: dict[str, object] = {}
        if s.prompt_tokens or s.completion_tokens:
            fields["tokens"] = _count(s.prompt_tokens + s.completion_tokens)
            cost = self.rules.cost(s.prompt_tokens, s.completion_tokens)
            if cost:
                fields["cost"] = f"{cost:.4f}"
        if not self.dry_run:
            fields.update(self.sender.status())
        return fields

    def skipped_indices(self) -> Any:
        if self.journal is None:
            return iter(())
        if self.settings.retry_failed:
            return self.journal.done_indices()
        return self.journal.finished_indices()

    async def produce(self) -> None:
        base_dir = self.storage.base_dir
        prep: PreparePool[Row, Request] = PreparePool(
            lambda row: self.op.prepare(row, base_dir), self.settings.prepare_workers
        )
        # Rows in progress: being prepared, waiting for a slot, in flight or backing off.
        self.active = asyncio.Semaphore(prep.workers * 2 + int(self.serving.max_workers) * 2)
        done = self.skipped_indices()
        next_done = next(done, None)
        with prep:
            try:
                batch: list[Row] = []
                for row in self.storage.read():
                    if self.summary.stopped:
                        break
                    self.summary.rows += 1
                    while next_done is not None and next_done < row.index:
                        next_done = next(done, None)
                    if next_done == row.index:
                        self.summary.skipped += 1
                        self.progress.update(skipped=True)
                        continue
                    if batch and self.active.locked():
                        # No room for this row: send the rows already taken in, rather than
                        # hold their places in a batch while waiting for one of them.
                        await prep.reserve()
                        self.spawn(self.prepare_batch(prep, batch))
                        batch = []
                    await self.active.acquire()
                    self.taken[row.index] = time.monotonic()
                    if row.error or self.failed_earlier(row):  # nothing to prepare
                        self.spawn(self.process(row, None), row=True)
                        continue
                    batch.append(row)
                    if len(batch) >= prep.batch_size():
                        await prep.reserve()  # the loop sends what is ready meanwhile
                        self.spawn(self.prepare_batch(prep, batch))
                        batch = []
                if batch:
                    await prep.reserve()
                    self.spawn(self.prepare_batch(prep, batch))
                while self.tasks:
                    await asyncio.wait(set(self.tasks))
            except asyncio.CancelledError:
                for task in self.tasks:
                    task.cancel()
                await asyncio.gather(*self.tasks, return_exceptions=True)
                raise

    def failed_earlier(self, row: Row) -> bool:
        """Whether ``row`` carries the error record of an earlier step of the pipeline."""
        error = row.data.get(ERROR_KEY)
        return (self.storage.reads_earlier_step and isinstance(error, dict)
                and isinstance(error.get("type"), str) and isinstance(error.get("message"), str))

    def _row_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.active.release()

    def spawn(self, coro: Any, row: bool = False) -> None:
        """Run ``coro`` as a task of this step; a row's task frees its place when it ends."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        if row:
            task.add_done_callback(self._row_done)
        else:
            task.add_done_callback(self.tasks.discard)

    async def prepare_batch(self, prep: PreparePool[Row, Request], rows: list[Row]) -> None:
        for row, prepared in zip(rows, await prep.run(rows), strict=True):
            self.spawn(self.process(row, prepared), row=True)

    async def process(self, row: Row, prepared: Request | Exception | None) -> None:
        summary = self.summary
        trace = _Trace(self.taken.pop(row.index, None))
        finish = functools.partial(self.finish, trace=trace)
        try:
            if row.error:
                raise RowError(row.error_type, row.error)
            if self.failed_earlier(row):
                # Failed in an earlier step: it stays failed, with that step's error record.
                finish(row, error=row.data[ERROR_KEY])
                return
            if isinstance(prepared, Exception):
                raise prepared
            assert prepared is not None
            request = prepared
            summary.images += request.image_count
            summary.image_bytes += request.image_bytes
            key = request_key(request, self.serving_key) if self.cache else None
            response = self.cache.get(key) if key and self.cache else None
            trace.cached = response is not None
            if self.dry_run:
                summary.image_tokens += request.image_tokens
                if row.index < _SHOWN_ESTIMATES:
                    summary.row_estimates.append(
                        (row.index, request.image_count, request.image_tokens)
                    )
                # The first row's request, whichever row's preparation ends first.
                if summary.example is None or row.index < self.example_index:
                    summary.example, self.example_index = request.messages, row.index
                summary.requests += response is None
                finish(row, fields={})
                return
            reasks = 0
            while True:
                fresh = response is None
                if response is None:
                    response = await self.settings.retry.call(
                        functools.partial(trace.send, self.sender.send, row.index), request,
                        self.count_retry, self.pause,
                    )
                else:
                    trace.cached = True
                try:
                    check_answer(response, self.settings.accept_truncated)
                    fields = self.op.apply(row, response)
                except RowError as exc:
                    if key and fresh and exc.kind == "Truncated":
                        self.cache_answer(key, response)
                    follow = self.op.reask(request, response, exc, reasks)
                    if follow is None:
                        raise
                    # Asked again with the reason: a retry of the row, with its own cache key.
                    reasks += 1
                    self.count_retry(None)
                    request = follow
                    key = request_key(request, self.serving_key) if self.cache else None
                    response = self.cache.get(key) if key and self.cache else None
                    continue
                # Only an answer the operator took is kept: one it refused is asked anew.
                if key and fresh:
                    self.cache_answer(key, response)
                break
        except Stopped:
            return
        except RowError as exc:
            finish(row, error=exc.record())
            return
        except ServingError as exc:
            finish(row, error={"type": exc.kind, "message": clean_message(exc),
                                    "stage": "request"})
            return
        except Exception as exc:  # a bug in an operator or serving must not end the run
            finish(row, error={"type": type(exc).__name__, "message": clean_message(exc),
                                    "stage": "request"})
            return
        try:
            finish(row, fields=fields)
        except (TypeError, ValueError) as exc:  # fields that cannot be written as JSON
            finish(row, error={"type": "BadOutput", "message": str(exc), "stage": "apply"})

    def cache_answer(self, key: str, response: Response) -> None:
        """Keep an answer for reruns: a whole one, or one cut off at the token limit (a larger
        ``max_tokens`` asks anew, and ``accept_truncated`` takes it as it is). A refusal or an
        empty answer is asked again next time."""
        try:
            check_answer(response)
        except AnswerError as exc:
            if exc.kind != "Truncated":
                return
        assert self.cache is not None
        self.cache.put(key, response)

    def count_retry(self, exc: ServingError | None) -> None:
        self.summary.retries += 1
        if self.summary.stopped:
            raise Stopped

    def finish(self, row: Row, *, fields: dict | None = None, error: dict | None = None,
               trace: _Trace | None = None) -> None:
        """Count a finished row and queue it for the next journal commit."""
        summary = self.summary
        # The line is made first: a row is counted only once it can be written.
        line = row.with_fields({ERROR_KEY: error} if error is not None else (fields or {}))
        if error is not None:
            summary.failed += 1
            self.failed_types[error["type"]] += 1
            if len(summary.failures) < 20:
                summary.failures.append((row.index, error))
        else:
            summary.done += 1
        self.progress.update(failed=error is not None)
        reason = self.rules.after_row(summary.done + summary.failed, summary.failed)
        if reason:
            self.stop(reason)
        if self.dry_run:
            return
        self.pending.append((row.index, error is None, line))
        self.wake_writer.set()
        result = RowResult(row.index, line, error)
        if trace is not None:
            result.queued, result.sent, result.answered = trace.queued, trace.sent, trace.answered
            result.attempts, result.cached = trace.attempts, trace.cached
        self.hook.capflow_row_finished(result=result)

    async def write_loop(self) -> None:
        # Group commit: rows finishing within a few milliseconds share one transaction.
        while True:
            await self.wake_writer.wait()
            await asyncio.sleep(_COMMIT_WINDOW)
            self.wake_writer.clear()
            try:
                self.flush()
            except sqlite3.Error as exc:
                transient = isinstance(exc, sqlite3.OperationalError) and (
                    "locked" in str(exc) or "busy" in str(exc))
                if not transient:
                    # A full disk, or one that fails: sending on would only lose answers.
                    self.stop(_store_failure(exc, self.journal))
                    return
                # A shared cache locked by another run for too long: try again.
                log.warning("could not commit finished rows yet (%s); retrying", exc)
                self.wake_writer.set()
                await asyncio.sleep(1.0)

    def flush(self) -> None:
        # Responses first: a row in the journal always has its answer cached too.
        if self.cache is not None:
            self.cache.commit()
        if self.journal is not None:
            # What was spent goes with the rows it paid for: a run killed later keeps both.
            spent = self.spent_since_commit()
            if self.pending or spent:
                self.journal.add(self.pending, spent)
                self.committed_spent = self.spent_now()
                self.pending = []  # only once committed: a failed commit is tried again

    def spent_now(self) -> dict[str, float]:
        s = self.summary
        return {"requests": s.requests, "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "cost": self.rules.cost(s.prompt_tokens, s.completion_tokens),
                "elapsed_s": time.perf_counter() - self.began}

    def spent_since_commit(self) -> dict[str, float]:
        """What this run spent since the last commit (seconds only along with something else:
        a commit of nothing but time is not worth one)."""
        now, before = self.spent_now(), self.committed_spent
        delta = {k: v - before.get(k, 0) for k, v in now.items()}
        if not any(delta[k] for k in delta if k != "elapsed_s") and not self.pending:
            return {}
        return delta

    def write_manifest(self) -> None:
        """``<output>.run.json``: what ran, when, and what came of it."""
        assert self.journal is not None
        record = manifest.build(
            self.summary, self.settings.run_context, input_name=self.storage.input_name,
            started=self.started_at, ended=datetime.datetime.now().astimezone(),
            this_run_failures=dict(self.failed_types.most_common()),
            output_failures=self.output_failures, output_spent=self.output_spent,
        )
        path = manifest.manifest_path(self.journal.path)
        outputs_written.append(self.storage.output_name)
        try:
            write_atomically(path, [manifest.dumps(record).rstrip("\n")])
        except OSError as exc:  # the output is written: a missing record is worth a line only
            log.warning("could not write the run's manifest %s: %s", path, exc.strerror or exc)

    def write_failed(self) -> None:
        path = self.settings.failed_output
        if not path or self.journal is None:
            return
        try:
            write_atomically(Path(path), self.journal.failed_lines())
        except OSError as exc:
            raise CapflowError(f"cannot write failed_output {path}: {exc.strerror or exc};"
                               f" the failed rows are in {self.journal.path} too") from None


def _store_failure(exc: sqlite3.Error, journal: RunJournal | None) -> str:
    where = journal.path if journal is not None else "the response cache"
    return (f"cannot commit finished rows to {where}: {exc}; free some space and run the same"
            " command again (finished rows are kept)")


def _count(n: int) -> str:
    """``n`` in few characters: 950, 12.3k, 4.56M."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


class _JournalRows:
    """The journal's rows in input order, as dicts or as their JSON text (``Storage.rows_as``),
    readable more than once (a CSV output reads them twice: once for its columns, once to
    write them)."""

    def __init__(self, journal: RunJournal, rows_as: str) -> None:
        self.journal = journal
        self.as_text = rows_as == "json"

    def __iter__(self) -> Iterator[Any]:
        lines = self.journal.lines()
        return lines if self.as_text else map(json.loads, lines)


class _Trace:
    """One row's way through the sending, for observers (``RowResult``)."""

    __slots__ = ("answered", "attempts", "cached", "queued", "sent")

    def __init__(self, queued: float | None) -> None:
        self.queued = queued
        self.sent: float | None = None
        self.answered: float | None = None
        self.attempts = 0
        self.cached = False

    async def send(self, send: Any, row: int, request: Request) -> Response:
        """``send(request, row=row)``, timed and counted: ``sent`` when the first request went
        out, not when it began to wait for its place."""
        self.attempts += 1
        response = await send(request, row=row, on_sent=self._went_out)
        self.answered = time.monotonic()
        return response

    def _went_out(self, when: float) -> None:
        if self.sent is None:
            self.sent = when
