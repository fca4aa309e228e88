"""The metrics of one run: rows streamed out as they finish, a textfile at the end.

A ``RunRecorder`` lives from ``capflow_run_start`` to ``capflow_run_end``. It keeps counters
and three ``LatencySample``s, never the rows themselves. Writing is the part that can fail (a
full disk, a folder it may not write to): the recorder then says so once, in a warning, stops
writing that file, and goes on counting, so that the run never notices.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

from capflow.run import RowResult, RunInfo, RunSummary
from capflow_metrics.quantiles import LatencySample
from capflow_metrics.rows import RowWriter, row_record
from capflow_metrics.settings import MetricsSettings
from capflow_metrics.textfile import Metric, format_metrics, write_atomically

log = logging.getLogger("capflow_metrics")

QUANTILES = (0.5, 0.9, 0.99)
# The phases of a row, as in the per-row records: queued -> sent -> answered -> finished.
PHASES = {
    "wait": "taken in to handed to the sending (image preparation, a place among the rows in"
            " progress)",
    "answer": "handed to the sending to answered (an in-flight slot, the requests, retries and"
              " their backoff)",
    "total": "taken in to finished",
}


def file_stem(output: str, job: int | None = None) -> str:
    """The files' common name: the step's output file name without its extension
    (``out.jsonl`` -> ``out``), and ``.job<N>`` for a sweep's job writing to a shared folder."""
    name = Path(output).name or "capflow"
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return stem if job is None else f"{stem}.job{job}"


class RunRecorder:
    """Counts one run's rows, streams their records, and writes the textfile at its end."""

    def __init__(self, run: RunInfo, settings: MetricsSettings) -> None:
        self.settings = settings
        self.output = run.output
        self.began = time.monotonic()
        self.run_id = round(time.time(), 3)
        stem = file_stem(run.output, settings.job)
        self.rows_path = settings.dir / f"{stem}.rows.jsonl"
        self.textfile_path = settings.dir / f"{stem}.prom"
        self.writes = True  # False once the folder turns out unusable: nothing more is tried
        self.statuses: Counter[str] = Counter({"ok": 0, "failed": 0})
        self.errors: Counter[str] = Counter()
        self.cached = 0
        self.attempts = 0
        self.retried_rows = 0
        self.latency = {phase: LatencySample() for phase in PHASES}
        self.writer: RowWriter | None = None
        try:
            settings.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._warn(f"cannot make the folder {settings.dir}", exc,
                       "no metrics are written for this run")
            self.writes = False
            return
        if settings.rows:
            try:
                self.writer = RowWriter(self.rows_path, settings.flush_seconds, settings.append)
            except OSError as exc:
                self._warn(f"cannot write {self.rows_path}", exc)

    # -- rows ------------------------------------------------------------------------

    def row_finished(self, result: RowResult) -> None:
        """Count one finished row and stream its record."""
        now = time.monotonic()
        record = row_record(result, self.began, now, self.run_id)
        self.statuses[record["status"]] += 1
        if result.error:
            self.errors[str(record["error_type"])] += 1
        self.cached += bool(result.cached)
        self.attempts += result.attempts
        self.retried_rows += result.attempts > 1
        for phase in PHASES:
            value = record[f"{phase}_s"]
            if value is not None:
                self.latency[phase].add(value)
        if self.writer is not None:
            try:
                self.writer.write(record, now)
            except OSError as exc:
                self._warn(f"cannot write {self.rows_path}", exc, "no more rows are written to it")
                self._close_writer()

    # -- the end -------------------------------------------------------------------------

    def close(self, summary: RunSummary | None) -> None:
        """Close the rows file and, given the run's summary, write the textfile."""
        self._close_writer()
        if summary is None or not self.settings.textfile or not self.writes:
            return
        try:
            write_atomically(self.textfile_path, format_metrics(self.metrics(summary)))
        except OSError as exc:
            self._warn(f"cannot write {self.textfile_path}", exc)

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as exc:
            self._warn(f"cannot write {self.rows_path}", exc)

    def metrics(self, summary: RunSummary) -> list[Metric]:
        """The run's metric families, every sample labelled with the step's output and the
        user's labels."""
        base = {"output": self.output, **self.settings.labels}

        def labelled(**more: str) -> dict[str, str]:
            return {**base, **more}

        finished = self.statuses["ok"] + self.statuses["failed"]
        rows = Metric("capflow_rows_total", "counter",
                      "Rows of the run by status: ok and failed (finished by this run), skipped"
                      " (finished by an earlier run, not sent again).")
        for status in ("ok", "failed"):
            rows.add(self.statuses[status], labelled(status=status))
        rows.add(summary.skipped, labelled(status="skipped"))

        errors = Metric("capflow_row_errors_total", "counter", "Failed rows by error type.")
        for error_type, count in sorted(self.errors.items()):
            errors.add(count, labelled(type=error_type))

        latency = Metric("capflow_row_latency_seconds", "summary",
                         "Seconds a row spent, by phase: "
                         + "; ".join(f"{p}: {what}" for p, what in PHASES.items()) + ".")
        for phase, sample in self.latency.items():
            for q, value in sample.quantiles(QUANTILES).items():
                latency.add(round(value, 6), labelled(phase=phase, quantile=format_quantile(q)))
            latency.add(round(sample.sum, 6), labelled(phase=phase), "_sum")
            latency.add(sample.count, labelled(phase=phase), "_count")

        longest = Metric("capflow_row_latency_max_seconds", "gauge",
                         "The longest time a row spent, by phase (NaN: no row timed).")
        for phase, sample in self.latency.items():
            longest.add(round(sample.max, 6) if sample.count else math.nan, labelled(phase=phase))

        elapsed = summary.elapsed or (time.monotonic() - self.began)
        return [
            rows,
            errors,
            Metric("capflow_rows_per_second", "gauge",
                   "Rows finished (ok or failed) per second of the run.")
            .add(round(finished / elapsed, 3) if elapsed > 0 else math.nan, base),
            latency,
            longest,
            Metric("capflow_cache_hits_total", "counter",
                   "Rows the response cache answered (no request sent for them).")
            .add(self.cached, base),
            Metric("capflow_requests_total", "counter",
                   "Requests sent to the serving, retries included.")
            .add(summary.requests, base),
            Metric("capflow_retries_total", "counter",
                   "Requests sent again after a transient failure, and re-asks.")
            .add(summary.retries, base),
            Metric("capflow_row_attempts_total", "counter",
                   "Requests of the finished rows, summed (retries and re-asks included).")
            .add(self.attempts, base),
            Metric("capflow_rows_retried_total", "counter",
                   "Finished rows that took more than one request.")
            .add(self.retried_rows, base),
            Metric("capflow_tokens_total", "counter", "Tokens spent by the run, by kind.")
            .add(summary.prompt_tokens, labelled(kind="prompt"))
            .add(summary.completion_tokens, labelled(kind="completion")),
            Metric("capflow_run_duration_seconds", "gauge", "Wall-clock seconds the run took.")
            .add(round(elapsed, 3), base),
            Metric("capflow_run_success", "gauge",
                   "1 when no row failed and the run was not stopped early, else 0.")
            .add(int(summary.ok), base),
            Metric("capflow_run_last_end_timestamp_seconds", "gauge",
                   "Unix time the run ended (alert on it growing old).")
            .add(round(time.time(), 3), base),
        ]

    def _warn(self, what: str, exc: OSError, then: str = "") -> None:
        """One line saying what could not be written and why; the run goes on."""
        log.warning("capflow-metrics: %s: %s%s", what, exc.strerror or exc,
                    f"; {then}" if then else "")


def format_quantile(q: float) -> str:
    """``0.5`` -> ``"0.5"``, ``0.99`` -> ``"0.99"``: the quantile label as clients write it."""
    return repr(float(q))
