"""The run manifest, ``<output>.run.json``: a machine-readable record of a run, beside its output.

It says what ran (capflow's and the plugins' versions, the command line, the resolved config
without secrets), when (start and end), and what came of it (the summary's counts, failures by
error type, requests, retries, cache hits, tokens, cost, elapsed), for this run and for the
output as a whole (which may hold rows of earlier runs).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capflow.redaction import redact
from capflow.run import RunSummary

SUFFIX = ".run.json"


@dataclass
class RunContext:
    """What the command line adds to a manifest (the Python API may leave it empty).

    :param command: the command line, as typed.
    :param config: the resolved config (no secrets: keys live in the environment).
    :param plugins: ``{"name", "package", "version"}`` of each plugin loaded.
    :param sweep: in a sweep, ``{"dir": the sweep folder, "job": the job's number,
        "overrides": the swept keys and this job's values}``.
    :param step: the step of the pipeline that wrote this output: ``{"number": 1-based,
        "of": how many, "name": its name in the pipeline, "outputs": every step's output}``.
    """

    command: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    plugins: list[dict[str, str]] = field(default_factory=list)
    sweep: dict[str, Any] | None = None
    step: dict[str, Any] | None = None


def manifest_path(journal: Path) -> Path:
    """Where the manifest of the output whose journal is ``journal`` goes."""
    name = journal.name.removesuffix(".journal.sqlite")
    return journal.with_name(name + SUFFIX)


def failed_by_type(lines: Iterable[str]) -> dict[str, int]:
    """Failed rows by their error type, from the rows' JSON text."""
    counts: Counter[str] = Counter()
    for line in lines:
        try:
            error = json.loads(line).get("_error") or {}
        except (ValueError, AttributeError):
            continue
        counts[str(error.get("type", "unknown")) if isinstance(error, dict) else "unknown"] += 1
    return dict(counts.most_common())


def build(summary: RunSummary, context: RunContext | None, *, input_name: str,
          started: datetime.datetime, ended: datetime.datetime,
          this_run_failures: dict[str, int], output_failures: dict[str, int],
          output_spent: dict[str, float] | None = None) -> dict[str, Any]:
    """The manifest as a JSON-ready dict."""
    from capflow import __version__

    context = context or RunContext()
    s = summary
    return {
        "capflow": __version__,
        "plugins": context.plugins,
        "command": context.command,
        "input": input_name,
        "output": s.output,
        "started": started.isoformat(timespec="seconds"),
        "ended": ended.isoformat(timespec="seconds"),
        "status": "stopped" if s.stopped else "finished",
        "stopped": s.stopped,
        "summary": {
            "rows": s.rows, "total": s.total, "done": s.done, "failed": s.failed,
            "failed_by_type": this_run_failures, "skipped": s.skipped,
            "requests": s.requests, "retries": s.retries, "cache_hits": s.cache_hits,
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "tokens_estimated_for": s.estimated_usage, "cost": round(s.cost, 6),
            "saved_against_live": round(s.saved, 6),
            "elapsed_s": round(s.elapsed, 3), "rate_limited": s.rate_limited,
            "max_workers": s.max_workers, "in_flight_limit": s.limit,
            "in_flight_lowest": s.limit_lowest, "outages": s.outages,
        },
        "output_rows": {"captioned": s.output_ok, "failed": s.output_failed,
                        "failed_by_type": output_failures},
        # What every run that wrote the output's rows spent together (a rerun that finds every
        # row done adds nothing but its seconds); it starts afresh when the settings change.
        "output_spent": _spent(output_spent or {}),
        "sweep": context.sweep,
        "step": context.step,
        "config": context.config,
    }


def _spent(spent: dict[str, float]) -> dict[str, Any]:
    figures: dict[str, Any] = {name: int(spent.get(name, 0)) for name in
                               ("requests", "prompt_tokens", "completion_tokens")}
    figures["cost"] = round(spent.get("cost", 0.0), 6)
    figures["elapsed_s"] = round(spent.get("elapsed_s", 0.0), 3)
    return figures


def dumps(manifest: dict[str, Any]) -> str:
    """The manifest's text, with every registered secret redacted."""
    return redact(json.dumps(manifest, indent=2, ensure_ascii=False, default=str)) + "\n"
