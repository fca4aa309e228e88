"""One finished row as a JSON Lines record, and the file those records stream to.

Times in ``RowResult`` are ``time.monotonic()`` readings, which mean nothing outside the
process; the record gives them as seconds since the run started (``queued``, ``sent``,
``answered``, ``finished``) and as the durations between them (``wait_s``, ``answer_s``,
``total_s``), rounded to the microsecond.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from capflow.run import RowResult

ROUND = 6  # microseconds: finer than monotonic() is worth on most systems


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - start, ROUND)


def _between(first: float | None, last: float | None) -> float | None:
    if first is None or last is None:
        return None
    return round(max(0.0, last - first), ROUND)


def row_record(result: RowResult, run_began: float, finished: float,
               run_id: float) -> dict[str, Any]:
    """The JSON record of one finished row.

    :param result: what capflow reports for the row.
    :param run_began: ``time.monotonic()`` at the run's start.
    :param finished: ``time.monotonic()`` when the row finished (when capflow reported it).
    :param run_id: the run's start as Unix time: tells runs apart in an appended file.

    ``wait_s`` is queued to sent (preparing the images, waiting for a place among the rows in
    progress), ``answer_s`` sent to answered, and ``total_s`` queued to finished; each is None
    when a moment is missing (a cached or failed row may send nothing, a failed one may get no
    answer). capflow takes ``sent`` when the row's first request is handed to its sending,
    which may still hold it for an in-flight slot, the learned pace or the circuit breaker:
    ``answer_s`` includes that wait, the request itself, and any retries with their backoff.
    """
    error = result.error or {}
    return {
        "index": result.index,
        "status": "failed" if result.error else "ok",
        "error_type": error.get("type"),
        "error_stage": error.get("stage"),
        "queued": _since(run_began, result.queued),
        "sent": _since(run_began, result.sent),
        "answered": _since(run_began, result.answered),
        "finished": round(finished - run_began, ROUND),
        "wait_s": _between(result.queued, result.sent),
        "answer_s": _between(result.sent, result.answered),
        "total_s": _between(result.queued, finished),
        "attempts": result.attempts,
        "cached": result.cached,
        "finished_at": round(time.time(), 3),
        "run": run_id,
    }


class RowWriter:
    """Streams row records to a JSON Lines file (replaced, or appended to), flushing at most
    ``flush_seconds`` after a line was written, so that a reader (``tail -f``) or a crash loses
    little while a busy run does not pay one system call per row. Memory stays bounded by the
    file's buffer."""

    def __init__(self, path: Path, flush_seconds: float, append: bool = False) -> None:
        self.path = path
        self.flush_seconds = flush_seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if append else "w"
        self._file: IO[str] | None = open(path, mode, encoding="utf-8")  # noqa: SIM115
        self._last_flush = time.monotonic()
        self.lines = 0

    def write(self, record: dict[str, Any], now: float) -> None:
        """Append one record; flush when the last flush is ``flush_seconds`` old."""
        if self._file is None:
            return
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.lines += 1
        if now - self._last_flush >= self.flush_seconds:
            self._file.flush()
            self._last_flush = now

    def close(self) -> None:
        """Flush and close the file (again: a no-op)."""
        file, self._file = self._file, None
        if file is not None:
            file.close()
