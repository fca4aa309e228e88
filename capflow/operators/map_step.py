"""MapStep: the base class for a pipeline step that sends no request (a map or a filter).

A subclass implements ``apply(row)``: it returns the fields to add to the row, or None to
drop the row (``raise DropRow("why")`` says why). ``apply`` runs in the preparation pool's
threads, many rows at once, so it may read files and decode images; ``admit(row)`` then runs
for each row in input order, for decisions that depend on the rows before (a near-duplicate
of an earlier row, say). Example, a step that counts a caption's words::

    class WordCount(MapStep):
        def apply(self, row):
            return {"words": len(str(row.get("caption", "")).split())}

Dropped rows go to a file of their own (``<output>.dropped.jsonl``, or for a step before the
last ``<output>.<step name>.dropped.jsonl``, unless ``dropped_output`` says otherwise), each
with a ``_dropped`` record saying which step dropped it and why, and are counted in the
summary. A row that raises ``capflow.errors.RowError`` fails with that error; rows that failed
an earlier step pass through untouched. The step keeps no journal: a rerun maps the rows again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from capflow.errors import ConfigError, RowError
from capflow.operators.base import Operator
from capflow.prepare_pool import PreparePool
from capflow.request import Request
from capflow.rows import Row
from capflow.run import RunSummary
from capflow.summary import format_summary

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.storage.base import Storage

log = logging.getLogger(__name__)
ERROR_KEY = "_error"
DROPPED_KEY = "_dropped"
CHUNK = 256  # rows handed to the pool at once; the next chunk is mapped while one is written


class DropRow(Exception):  # noqa: N818 - raised to say what happens, like StopIteration
    """Raised by ``MapStep.apply`` to drop the row; the message says why."""


class MapStep(Operator):
    """A step that maps each row in the preparation pool, or drops it, sending nothing.

    :param dropped_output: where dropped rows go (.jsonl); None: beside the step's output,
        as ``<output>.dropped.jsonl``.
    """

    #: Steps built from the config get no ``serving``: they send nothing.
    sends_requests: ClassVar[bool] = False
    #: The folder relative image paths in rows resolve against; set before ``apply`` runs.
    base_dir: Path = Path(".")

    def __init__(self, dropped_output: str | None = None) -> None:
        self.dropped_output = dropped_output

    def apply(self, row: dict[str, Any]) -> dict[str, Any] | None:  # type: ignore[override]
        """The fields to add to ``row`` (a dict of the row's fields; do not change it), or
        None to drop it. Runs in a worker thread. Raise ``DropRow("why")`` to drop it with a
        reason, ``capflow.errors.RowError`` to fail it."""
        raise NotImplementedError(f"{type(self).__name__} must implement apply(row)")

    def admit(self, row: dict[str, Any]) -> str | None:
        """Why to drop ``row`` (its fields, with those ``apply`` added), or None to keep it.
        Runs for each row in input order, on one thread; the default keeps every row."""
        return None

    def dropped_record(self, reason: str) -> dict[str, Any]:
        """The ``_dropped`` record of a row this step dropped."""
        return {"step": type(self).__name__, "reason": reason}

    def prepare(self, row: Row, base_dir: Path) -> Request:
        raise TypeError(f"{type(self).__name__} sends no requests: run it with run()")

    # -- running ----------------------------------------------------------------------------

    def run(self, storage: Storage, *, dry_run: bool = False,
            settings: EngineSettings | None = None, **keys: Any) -> RunSummary:
        """Map every row of ``storage``: the kept go to its output, the dropped to
        ``dropped_output``, both streamed. Returns the summary (``done`` kept, ``dropped``,
        ``failed``: rows that failed here or in an earlier step)."""
        from capflow.engine import record

        for name, value in keys.items():
            if not hasattr(self, name):
                raise TypeError(f"{type(self).__name__}.run() got an unknown setting {name!r}")
            setattr(self, name, value)
        began = time.perf_counter()
        started = datetime.datetime.now().astimezone()
        storage.check()
        self.base_dir = storage.base_dir
        dropped_path = Path(self.dropped_output or _default_dropped(storage, settings))
        summary = RunSummary(dry_run=dry_run, output=storage.output_name)
        summary.dropped_output = str(dropped_path)
        self._failed_types: Counter[str] = Counter()
        if dry_run:
            deque(self._kept(storage, summary, None), maxlen=0)  # counted, not written
        else:
            self._write(storage, summary, dropped_path)
        summary.total = summary.rows
        summary.output_ok, summary.output_failed = summary.done, summary.failed
        summary.elapsed = time.perf_counter() - began
        if not dry_run:
            self._write_manifest(storage, summary, settings, started)
        text = format_summary(summary)
        if settings is None or settings.report:
            print(text, flush=True)
        record.info("%s", text)
        return summary

    def _map_one(self, row: Row) -> dict[str, Any] | None:
        if row.error or isinstance(row.data.get(ERROR_KEY), dict):
            return {}  # failed earlier: passed through as it is
        return self.apply(row.data)

    def _mapped(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Any]]:
        """Each row with what ``apply`` returned (or raised), in input order; the pool maps the
        next chunk while this one is consumed."""
        loop = asyncio.new_event_loop()
        try:
            with PreparePool(self._map_one) as pool:

                async def map_chunk(chunk: list[Row]) -> list[Any]:
                    batches = [chunk[i:i + 8] for i in range(0, len(chunk), 8)]
                    done = []
                    for batch in batches:
                        await pool.reserve()
                        done.append(asyncio.ensure_future(pool.run(batch)))
                    return [out for results in await asyncio.gather(*done) for out in results]

                pending: tuple[list[Row], asyncio.Task[list[Any]]] | None = None
                source = iter(rows)
                while True:
                    chunk = list(islice(source, CHUNK))
                    task = loop.create_task(map_chunk(chunk)) if chunk else None
                    if task is not None:
                        loop.run_until_complete(asyncio.sleep(0))  # the chunk goes to the pool
                    if pending is not None:
                        previous, mapping = pending
                        yield from zip(previous, loop.run_until_complete(mapping), strict=True)
                    if task is None:
                        return
                    pending = (chunk, task)
        finally:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _kept(self, storage: Storage, summary: RunSummary, dropped: IO[str] | None
              ) -> Iterator[Any]:
        """The kept rows (dicts or JSON text, as ``storage.rows_as`` says), as they are mapped;
        the dropped ones go to ``dropped``."""
        as_text = storage.rows_as == "json"

        def out(row: Row, fields: dict[str, Any]) -> Any:
            return row.with_fields(fields) if as_text else {**row.data, **fields}

        for row, result in self._mapped(storage.read()):
            summary.rows += 1
            error = row.data.get(ERROR_KEY)
            if row.error or isinstance(error, dict):
                # Failed before this step (or unreadable): kept, still failed, untouched.
                error = error if isinstance(error, dict) else \
                    RowError(row.error_type, row.error or "").record()
                yield out(row, self._failed(summary, row, error))
                continue
            reason: str | None = None
            if isinstance(result, DropRow):
                reason = str(result) or f"dropped by {type(self).__name__}"
            elif isinstance(result, Exception):
                error = (result.record() if isinstance(result, RowError)
                         else {"type": type(result).__name__, "message": str(result)})
                yield out(row, self._failed(summary, row, error))
                continue
            elif result is None:
                reason = f"dropped by {type(self).__name__}"
            fields = result if isinstance(result, dict) else {}
            if reason is None:
                reason = self.admit({**row.data, **fields})
            if reason is None:
                summary.done += 1
                yield out(row, fields)
                continue
            summary.dropped += 1
            if dropped is not None:
                dropped.write(row.with_fields({**fields, DROPPED_KEY: self.dropped_record(reason)})
                              + "\n")

    def _failed(self, summary: RunSummary, row: Row, error: dict[str, Any]) -> dict[str, Any]:
        summary.failed += 1
        self._failed_types[str(error.get("type"))] += 1
        if len(summary.failures) < 20:
            summary.failures.append((row.index, error))
        return {ERROR_KEY: error}

    def _write(self, storage: Storage, summary: RunSummary, dropped_path: Path) -> None:
        """Both files in one pass over the rows, each replaced atomically."""
        try:
            dropped_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dropped_path.name[:200]}.", suffix=".tmp",
                                       dir=dropped_path.parent)
        except OSError as exc:
            raise ConfigError(f"cannot write the dropped rows to {dropped_path}:"
                              f" {exc.strerror or exc}") from None
        try:
            with open(fd, "w", encoding="utf-8") as dropped:
                kept = self._kept(storage, summary, dropped)
                if storage.rows_as == "json":
                    storage.write(kept)  # FileStorage spools a one-pass iterator itself
                else:
                    spooled = _Spooled(kept)
                    try:
                        storage.write(spooled)
                    finally:
                        spooled.close()
                dropped.flush()
                os.fsync(dropped.fileno())
            os.replace(tmp, dropped_path)
        except OSError as exc:
            raise ConfigError(f"cannot write the dropped rows to {dropped_path}:"
                              f" {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _write_manifest(self, storage: Storage, summary: RunSummary,
                        settings: EngineSettings | None, started: datetime.datetime) -> None:
        """``<output>.run.json``, as every step leaves one (a sweep's comparison reads it)."""
        from capflow import manifest
        from capflow.engine import outputs_written

        record = manifest.build(
            summary, settings.run_context if settings else None, input_name=storage.input_name,
            started=started, ended=datetime.datetime.now().astimezone(), this_run_failures={},
            output_failures=dict(self._failed_types.most_common()))
        record["dropped"] = {"rows": summary.dropped, "file": summary.dropped_output}
        path = Path(f"{storage.output_name}{manifest.SUFFIX}")
        outputs_written.append(storage.output_name)
        try:
            path.write_text(manifest.dumps(record), encoding="utf-8")
        except OSError as exc:
            log.warning("could not write the run's manifest %s: %s", path, exc.strerror or exc)


def _default_dropped(storage: Storage, settings: EngineSettings | None) -> str:
    """``<output>.dropped.jsonl``; for a step before the last, beside the pipeline's output
    (``<output>.<step>.dropped.jsonl``), not among the step files where nobody looks."""
    step = settings.run_context.step if settings and settings.run_context else None
    if step and step.get("number", 0) < step.get("of", 0) and step.get("outputs"):
        return f"{step['outputs'][-1]}.{step.get('name', 'step')}.dropped.jsonl"
    return f"{storage.output_name}.dropped.jsonl"


class _Spooled:
    """Rows written to a nameless temporary file as they come, then readable any number of
    times: the storage contract lets a storage read its rows twice (for its columns first)."""

    def __init__(self, rows: Iterator[dict[str, Any]]) -> None:
        self.file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - see close()
        for row in rows:
            self.file.write(json.dumps(row, ensure_ascii=False))
            self.file.write("\n")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.file.seek(0)
        return (json.loads(line) for line in self.file)

    def close(self) -> None:
        self.file.close()
