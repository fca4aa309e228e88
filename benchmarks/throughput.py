"""Throughput and memory scenarios: many requests in flight against a slow server.

Each client (capflow, and the reference client beside it with ``--with-reference``) gets a
fresh server, so its request log holds that client's requests only. Rows share 512 distinct
images and capflow's response cache is off, so every row costs exactly one request.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from benchmarks.context import Context
from benchmarks.datasets import Dataset, Verdict, dataset, verify
from benchmarks.harness import RunResult, Server, capflow_command, run_measured
from benchmarks.report import Figure, ScenarioResult, at_least, at_most, check, info
from capflow.testing.server import DEFAULT_MODEL

T = TypeVar("T")
IMAGES = 512
RSS_LIMIT_MB = 150.0
STARTUP_LIMIT_S = 1.0


@dataclass(frozen=True)
class Workload:
    """Rows, requests in flight, server latency, and the targets that apply."""

    rows: int
    workers: int
    latency: float
    min_pct_of_ideal: float | None = None
    max_cpu_ms: float | None = None


WORKLOADS = {
    "throughput-1024": Workload(10_000, 1024, 2.0, min_pct_of_ideal=90, max_cpu_ms=1.0),
    "throughput-256": Workload(5_000, 256, 1.0, min_pct_of_ideal=95),
    "memory": Workload(100_000, 256, 0.05),
}


@dataclass
class Measured:
    """One client's run of a workload, and what the server saw of it."""

    run: RunResult
    verdict: Verdict
    rows: int
    ideal: float
    max_in_flight: int
    log: list[tuple[float, int]]
    latency: float

    @property
    def pct_of_ideal(self) -> float:
        """Ideal time (full waves of requests) as a percentage of the elapsed wall time."""
        return 100 * self.ideal / self.run.wall

    @property
    def cpu_ms(self) -> float:
        """Client user+sys CPU per row, in milliseconds."""
        return 1000 * self.run.cpu / self.rows

    @property
    def mean_in_flight(self) -> float:
        """Requests held by the server on average, from first arrival to last reply."""
        if not self.log:
            return math.nan
        span = self.log[-1][0] + self.latency - self.log[0][0]
        return len(self.log) * self.latency / span

    @property
    def startup(self) -> float:
        """Seconds from the client's spawn to the server receiving its first request."""
        return self.log[0][0] - self.run.started if self.log else math.nan


def client_command(client: str, data: Dataset, out: Path, url: str, workers: int) -> list[str]:
    """The command line of ``client`` ("capflow" or "reference") for one workload run."""
    if client == "capflow":
        return capflow_command(input=data.path, output=out, api_url=url, max_workers=workers,
                               **{"cache.enabled": "false"})
    return [sys.executable, "-m", "benchmarks.reference", "--input", str(data.path),
            "--output", str(out), "--api-url", url, "--model", DEFAULT_MODEL,
            "--workers", str(workers)]


def measure(ctx: Context, name: str, wl: Workload, rows: int, client: str) -> Measured:
    """Run ``client`` once over the workload's dataset, against a fresh server."""
    data = dataset(ctx.cache_root, rows, IMAGES)
    d = ctx.rundir(name, client)
    package_parent = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    with Server(wl.latency, log_dir=d) as srv:
        cmd = client_command(client, data, d / "out.jsonl", srv.base_url, wl.workers)
        run = run_measured(cmd, d, env={"PYTHONPATH": pythonpath})
        stats, log = srv.stats(), srv.log()
    ideal = math.ceil(rows / wl.workers) * wl.latency
    return Measured(run, verify(d / "out.jsonl", data), rows, ideal, stats["max_in_flight"],
                    log, wl.latency)


def figures(wl: Workload, cap: Measured, ref: Measured | None) -> list[Figure]:
    """The table of a throughput scenario (reference figures beside capflow's)."""

    def of(get: Callable[[Measured], T]) -> T | None:
        return None if ref is None else get(ref)

    def out(m: Measured) -> str:
        return f"{m.verdict}; exit {m.run.returncode}"

    rows = [
        check("output", out(cap), "all rows, exit 0",
              cap.verdict.ok and cap.run.returncode == 0, of(out)),
        info("elapsed (s)", f"{cap.run.wall:.2f} (ideal {cap.ideal:.1f})",
             of(lambda m: f"{m.run.wall:.2f}")),
    ]
    pct = of(lambda m: m.pct_of_ideal)
    if wl.min_pct_of_ideal is not None:
        rows.append(at_least("% of ideal", cap.pct_of_ideal, wl.min_pct_of_ideal, "{:.1f}",
                             reference=pct, timing=True))
    else:
        rows.append(info("% of ideal", f"{cap.pct_of_ideal:.1f}",
                         of(lambda m: f"{m.pct_of_ideal:.1f}")))
    cpu = of(lambda m: m.cpu_ms)
    if wl.max_cpu_ms is not None:
        rows.append(at_most("client CPU per request (ms)", cap.cpu_ms, wl.max_cpu_ms, "{:.3f}",
                            reference=cpu, timing=True))
    else:
        rows.append(info("client CPU per request (ms)", f"{cap.cpu_ms:.3f}",
                         of(lambda m: f"{m.cpu_ms:.3f}")))
    rows += [
        at_most("client peak RSS (MB)", cap.run.max_rss_mb, RSS_LIMIT_MB, "{:.1f}",
                reference=of(lambda m: m.run.max_rss_mb)),
        info("server max in flight", f"{cap.max_in_flight} (of {wl.workers})",
             of(lambda m: str(m.max_in_flight))),
        info("server mean in flight", f"{cap.mean_in_flight:.1f}",
             of(lambda m: f"{m.mean_in_flight:.1f}")),
        at_most("start-up to first request (s)", cap.startup, STARTUP_LIMIT_S, "{:.3f}",
                reference=of(lambda m: m.startup)),
    ]
    return rows


def throughput(ctx: Context, name: str) -> ScenarioResult:
    """Run the named workload with capflow (and the reference client when asked)."""
    wl = WORKLOADS[name]
    rows = ctx.size(wl.rows)
    res = ScenarioResult(name, f"{rows} rows, {wl.workers} in flight, latency {wl.latency} s"
                         f" ({IMAGES} distinct images, cache off)")
    cap = measure(ctx, name, wl, rows, "capflow")
    ref = measure(ctx, name, wl, rows, "reference") if ctx.with_reference else None
    res.add(*figures(wl, cap, ref))
    if not cap.verdict.ok or cap.run.returncode:
        res.notes.append("capflow said: " + cap.run.brief().replace("\n", "\n         "))
    return res


def reference_alone(ctx: Context) -> ScenarioResult:
    """The reference client alone on the throughput-256 workload (no targets but output)."""
    wl = WORKLOADS["throughput-256"]
    rows = ctx.size(wl.rows)
    res = ScenarioResult("reference", f"reference client alone: {rows} rows, {wl.workers} "
                         f"threads, latency {wl.latency} s")
    m = measure(ctx, "reference", wl, rows, "reference")
    res.add(
        check("output", f"{m.verdict}; exit {m.run.returncode}", "all rows, exit 0",
              m.verdict.ok and m.run.returncode == 0),
        info("elapsed (s)", f"{m.run.wall:.2f} (ideal {m.ideal:.1f})"),
        info("% of ideal", f"{m.pct_of_ideal:.1f}"),
        info("client CPU per request (ms)", f"{m.cpu_ms:.3f}"),
        info("client peak RSS (MB)", f"{m.run.max_rss_mb:.1f}"),
        info("server max / mean in flight", f"{m.max_in_flight} / {m.mean_in_flight:.1f}"),
        info("start-up to first request (s)", f"{m.startup:.3f}"),
    )
    return res
