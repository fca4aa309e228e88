"""capflow-metrics: per-row metrics and a Prometheus textfile for each capflow run.

An observer plugin. Chosen with ``+metrics=files`` on the command line, it writes, for each
pipeline step that sends requests:

- ``<metrics.dir>/<output stem>.rows.jsonl``: one JSON object per row as it finishes (status,
  error type, timings, attempts, cached), streamed and flushed every ``metrics.flush_seconds``;
- ``<metrics.dir>/<output stem>.prom``: at the end of the run, the run's counts, rate and
  latency percentiles in the text format of node_exporter's textfile collector, replaced
  atomically.

Without ``+metrics=files`` (the run's config has no ``metrics`` key), dry runs and runs started
from Python do nothing and write no file. A failure to write is a warning; it never stops a run.
"""

from __future__ import annotations

import atexit
import logging
from typing import TYPE_CHECKING

from capflow import hookimpl
from capflow_metrics.recorder import RunRecorder
from capflow_metrics.settings import MetricsSettings, SettingsError

if TYPE_CHECKING:
    from capflow.plugins import ConfigRegistry
    from capflow.run import RowResult, RunInfo, RunSummary

__all__ = ["MetricsSettings", "RunRecorder"]

log = logging.getLogger("capflow_metrics")

# The run being observed. capflow runs one step at a time, and the row hook does not say which
# run a row belongs to: one recorder at a time.
_recorder: RunRecorder | None = None


def _finish(summary: RunSummary | None) -> None:
    """Close the current recorder, writing its textfile when the run's summary is known."""
    global _recorder
    recorder, _recorder = _recorder, None
    if recorder is not None:
        recorder.close(summary)


# A run that ended by an exception calls no capflow_run_end: its rows file is still closed.
atexit.register(_finish, None)


@hookimpl
def capflow_register_config(config: ConfigRegistry) -> None:
    """Add the option ``+metrics=files`` (``conf/metrics/files.yaml``)."""
    config.add_search_path("pkg://capflow_metrics.conf")


@hookimpl
def capflow_run_start(run: RunInfo) -> None:
    """Start recording a run, if its config asks for metrics (and it is no dry run)."""
    global _recorder
    _finish(None)  # a run that never ended (an exception): its rows file is closed
    if run.dry_run:
        return
    try:
        settings = MetricsSettings.from_config(run.config)
    except SettingsError as exc:
        log.warning("capflow-metrics: %s; no metrics are written for this run", exc)
        return
    if settings is None or not settings.writes_anything:
        return
    _recorder = RunRecorder(run, settings)


@hookimpl
def capflow_row_finished(result: RowResult) -> None:
    """Count a finished row and stream its record."""
    if _recorder is not None:
        _recorder.row_finished(result)


@hookimpl
def capflow_run_end(summary: RunSummary) -> None:
    """Close the rows file and write the textfile."""
    _finish(summary)
