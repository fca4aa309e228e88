"""RayExecutor: a capflow job as a Ray Data job.

The driver (the ``capflow`` command) checks the input and output as ``executor=local`` does,
reads the rows and hands them to Ray Data, ``rows_per_pass`` at a time, as their JSON text.
Each pass is one ``map_batches`` over a pool of ``num_workers`` actors (``capflow_ray.worker``),
every actor running all the pipeline's steps over its batches with capflow's engine. The
finished rows stream back to the driver in input order and into the output, which replaces
the old one atomically at the end, as locally; the figures of every batch add up to each
step's summary, printed and recorded in ``<output>.run.json`` as locally.

Durability comes from the response cache, which the actors share (SQLite in WAL mode on this
machine): every answer is committed as it comes, so a job killed at any moment and run again
pays again only for the requests that were in flight.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from capflow import Executor, Job, LocalExecutor, RunSummary
from capflow.errors import ConfigError
from capflow.storage.file import check_output_path
from capflow.summary import format_summary
from capflow_ray.budget import share

log = logging.getLogger("capflow")


class RayExecutor(Executor):
    """Runs the pipeline's steps on a pool of Ray actors.

    :param num_workers: actors, each running capflow's engine over its batches (never more than
        ``max_workers``: each needs at least one request in flight).
    :param num_cpus: CPUs of the local Ray started when ``RAY_ADDRESS`` is not set (None: all).
    :param batch_rows: rows per batch handed to an actor.
    :param rows_per_pass: rows held by the driver at once; a larger input runs in passes.
    :param rows_per_shard: rows per file when the output is a folder (``output=out/``).
    """

    def __init__(self, num_workers: int = 2, num_cpus: int | None = None,
                 batch_rows: int = 256, rows_per_pass: int = 100_000,
                 rows_per_shard: int = 100_000) -> None:
        if min(int(num_workers), int(batch_rows), int(rows_per_pass), int(rows_per_shard)) < 1:
            raise ConfigError("executor.num_workers, batch_rows, rows_per_pass and"
                              " rows_per_shard must be at least 1")
        self.num_workers = int(num_workers)
        self.num_cpus = int(num_cpus) if num_cpus else None
        self.batch_rows = int(batch_rows)
        self.rows_per_pass = int(rows_per_pass)
        self.rows_per_shard = int(rows_per_shard)

    def run(self, job: Job) -> list[RunSummary]:
        if job.dry_run:  # nothing is sent: the local engine says what would be
            return LocalExecutor().run(job)
        n = len(job.steps)
        # A folder (out/) takes the rows as shards of JSON Lines, for jobs too large for a file.
        shards = Path(job.output) if job.output and (
            job.output.endswith(("/", os.sep)) or Path(job.output).is_dir()) else None
        last_output = None if shards else job.output
        views = [job.storage.step(output=last_output if i == n - 1 else None) for i in range(n)]
        first, last = views[0], views[-1]
        first.check()
        if shards is None:
            check_output_path(last.output_name)
        actors = max(1, min(self.num_workers, int(job.serving.max_workers)))
        config = share(job.config, actors)  # the first pass's: for the figures below
        started = datetime.datetime.now().astimezone()
        began = time.perf_counter()
        summaries = [RunSummary(output=view.output_name) for view in views]
        if shards is not None:
            summaries[-1].output = str(shards)
        dropped = _dropped_files(job, summaries[-1].output)
        for number, path in dropped.items():
            summaries[number - 1].dropped_output = str(path)
        gathered = _Gathered(summaries, first.count(cheap_only=True), job.settings, dropped)
        with _ray(self.num_cpus):
            lines = gathered.lines(self._passes(first, job, gathered, actors))
            if shards is None and last.rows_as != "json":
                # A storage of dicts may read its rows twice (for its columns first).
                with _Spooled(lines) as rows:
                    last.write(rows)
            elif shards is None:
                last.write(lines)
            else:
                write_shards(shards, lines, self.rows_per_shard)
        gathered.done()  # the dropped rows' files, in place
        elapsed = time.perf_counter() - began
        for summary in summaries:
            summary.elapsed = elapsed
            summary.total = summaries[0].rows
            summary.max_workers = int(job.serving.max_workers)
            # The actors' ceilings together (each adapts its own below it).
            summary.limit = summary.limit_lowest = actors * int(config["serving"]["max_workers"])
        final = summaries[-1]
        final.output_ok = final.done + final.skipped
        final.output_failed = sum(gathered.failed_types.values())
        text = format_summary(final)
        if job.settings.report:
            print(text, flush=True)
        logging.getLogger("capflow.record").info("%s", text)
        _write_manifest(job, first.input_name, final, started, gathered.failed_types)
        return summaries

    def _passes(self, first: Any, job: Job, gathered: _Gathered, actors: int
                ) -> Iterator[dict[str, Any]]:
        """The finished batches' records, pass after pass, in input order. Each pass's actors
        share what the passes before left of the token and cost budgets."""
        import ray.data

        from capflow_ray.worker import CapflowWorker

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        with contextlib.suppress(AttributeError):
            context.enable_progress_bars = False
        rows = first.read()
        while chunk := list(islice(rows, self.rows_per_pass)):
            config = share(_left(job, gathered.summaries), actors)
            spent = _spent_budget(config)
            if spent:
                gathered.summaries[-1].stopped = spent
                return
            items = [{"index": row.index,
                      "row": row.raw or json.dumps(row.data, default=str),
                      "error": row.error or "", "error_type": row.error_type}
                     for row in chunk]
            dataset = ray.data.from_items(items).map_batches(
                CapflowWorker, batch_size=self.batch_rows, batch_format="default",
                compute=ray.data.ActorPoolStrategy(size=actors),
                fn_constructor_kwargs={"config": config, "base_dir": str(first.base_dir)})
            yield from dataset.iter_batches(batch_size=None, batch_format="default")


class _Gathered:
    """The finished rows as they stream back: their text for the output, the figures added
    up into each step's summary, a progress line now and then."""

    def __init__(self, summaries: list[RunSummary], total: int | None, settings: Any,
                 dropped: dict[int, Path]) -> None:
        self.summaries = summaries
        self.dropped = dropped  # step number: the file its dropped rows go to
        self.dropped_files: dict[int, Any] = {}
        self.total = total
        self.failed_types: Counter[str] = Counter()
        self.rows = 0
        self.began = time.monotonic()
        self.interval = float(settings.progress_interval or 10)
        self.progress = bool(settings.progress)
        self.next_line = self.began + self.interval

    def lines(self, batches: Iterator[dict[str, Any]]) -> Iterator[str]:
        for batch in batches:
            for text, kind in zip(batch["row"], batch["kind"], strict=True):
                if kind == "figures":
                    self._add(json.loads(text))
                    continue
                if kind:  # dropped:<step>
                    self._drop(int(str(kind).split(":")[1]), str(text))
                    continue
                self.rows += 1
                if '"_error"' in text:
                    error = json.loads(text).get("_error")
                    if isinstance(error, dict):
                        self.failed_types[str(error.get("type"))] += 1
                yield str(text)
            self._tick()

    def _drop(self, step: int, line: str) -> None:
        out = self.dropped_files.get(step)
        if out is None:
            path = self.dropped[step]
            path.parent.mkdir(parents=True, exist_ok=True)
            out = self.dropped_files[step] = open(  # noqa: SIM115 - closed in done()
                path.with_name(f".{path.name}.tmp"), "w", encoding="utf-8")
        out.write(line + "\n")

    def _add(self, figures: list[dict[str, Any]]) -> None:
        for summary, step in zip(self.summaries, figures, strict=False):
            for name, value in step.items():
                if name == "stopped":
                    summary.stopped = summary.stopped or value
                elif name == "cache_size":  # the actors share one cache: its size, not a sum
                    summary.cache_size = max(summary.cache_size, value)
                elif name == "failures":
                    room = 20 - len(summary.failures)
                    summary.failures.extend(tuple(f) for f in value[:max(0, room)])
                else:
                    setattr(summary, name, getattr(summary, name) + value)

    def _tick(self) -> None:
        now = time.monotonic()
        if not self.progress or now < self.next_line:
            return
        self.next_line = now + self.interval
        seconds = now - self.began
        of = f"/{self.total}" if self.total else ""
        share_done = f" ({100 * self.rows / self.total:.0f}%)" if self.total else ""
        print(f"[capflow] {seconds:.0f}s: {self.rows}{of} rows{share_done},"
              f" {self.rows / seconds:.1f} rows/s", file=sys.stderr, flush=True)

    def done(self) -> None:
        for summary in self.summaries:
            summary.failures.sort(key=lambda f: f[0])  # by row: the errors do not compare
        for step, path in self.dropped.items():
            out = self.dropped_files.pop(step, None)
            if out is None:  # nothing dropped: an empty list, as locally
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("", encoding="utf-8")
                continue
            out.close()
            os.replace(out.name, path)


def _left(job: Job, summaries: list[RunSummary]) -> dict[str, Any]:
    """The config with its token and cost budgets less what earlier passes spent."""
    config = dict(job.config)
    tokens = sum(s.prompt_tokens + s.completion_tokens for s in summaries)
    cost = sum(job.settings.stop.cost(s.prompt_tokens, s.completion_tokens) for s in summaries)
    if config.get("max_tokens_total") is not None:
        config["max_tokens_total"] = max(0, int(config["max_tokens_total"]) - tokens)
    if config.get("max_cost") is not None:
        config["max_cost"] = max(0.0, float(config["max_cost"]) - cost)
    return config


def _spent_budget(config: dict[str, Any]) -> str | None:
    """Why no further pass may run: a budget already spent."""
    for key in ("max_tokens_total", "max_cost"):
        if config.get(key) is not None and config[key] <= 0:
            return f"{key} reached"
    return None


class _Spooled:
    """Finished rows' text spooled to a nameless temporary file, read back as dicts as often as
    a storage needs."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - __exit__
        for line in lines:
            self.file.write(line + "\n")

    def __enter__(self) -> _Spooled:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.file.seek(0)
        return (json.loads(line) for line in self.file)


def _dropped_files(job: Job, output: str) -> dict[int, Path]:
    """Where each map step's dropped rows go, by step number: the step's ``dropped_output``,
    else beside the output as locally (``<output>.dropped.jsonl`` for the last step,
    ``<output>.<step>.dropped.jsonl`` for one before)."""
    from capflow import MapStep

    out: dict[int, Path] = {}
    n = len(job.steps)
    for number, (name, op) in enumerate(job.steps, 1):
        if not isinstance(op, MapStep):
            continue
        base = output.rstrip("/" + os.sep)
        default = f"{base}.dropped.jsonl" if number == n else f"{base}.{name}.dropped.jsonl"
        out[number] = Path(op.dropped_output or default)
    return out


def write_shards(folder: Path, lines: Iterator[str], rows_per_shard: int) -> None:
    """``folder/part-00000.jsonl``, ``part-00001.jsonl``, ... of ``rows_per_shard`` rows each,
    streamed, each replaced atomically; shards of an earlier, larger run are removed."""
    from capflow.storage.atomic import write_atomically

    folder.mkdir(parents=True, exist_ok=True)
    written = set()
    for number in itertools.count():
        chunk = list(islice(lines, rows_per_shard))
        if not chunk and number:
            break
        path = folder / f"part-{number:05d}.jsonl"
        write_atomically(path, chunk)
        written.add(path)
        if not chunk:
            break
    for stale in folder.glob("part-*.jsonl"):
        if stale not in written:
            stale.unlink()


@contextlib.contextmanager
def _ray(num_cpus: int | None) -> Iterator[None]:
    """Ray for the run: the cluster ``RAY_ADDRESS`` names, else a local one, stopped after."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **quiet)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


def _write_manifest(job: Job, input_name: str, summary: RunSummary,
                    started: datetime.datetime, failed: Counter[str]) -> None:
    from capflow import manifest
    from capflow.engine import outputs_written

    record = manifest.build(summary, job.settings.run_context, input_name=input_name,
                            started=started, ended=datetime.datetime.now().astimezone(),
                            this_run_failures=dict(failed.most_common()),
                            output_failures=dict(failed.most_common()))
    record["executor"] = "ray"
    output = Path(summary.output)
    path = (output / f"capflow{manifest.SUFFIX}" if output.is_dir()
            else Path(f"{summary.output}{manifest.SUFFIX}"))
    outputs_written.append(summary.output)
    try:
        path.write_text(manifest.dumps(record), encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the run's manifest %s: %s", path, exc.strerror or exc)
