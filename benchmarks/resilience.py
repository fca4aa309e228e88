"""Scenarios of a run that meets trouble: faults, a kill -9, a rerun, a rate limit."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.context import Context
from benchmarks.datasets import Dataset, Verdict, dataset, verify
from benchmarks.harness import RunResult, Server, capflow_command, run_measured
from benchmarks.report import Figure, ScenarioResult, at_most, check, info

FAULTS = {"429": 0.10, "500": 0.05, "hang": 0.01, "malformed": 0.01}


def output_check(name: str, verdict: Verdict, run: RunResult) -> Figure:
    """The correctness figure of one run: every row right, and exit status 0."""
    return check(name, f"{verdict}; exit {run.returncode}", "all rows, exit 0",
                 verdict.ok and run.returncode == 0)


def _command(data: Dataset, out: Path, server: Server, **overrides: object) -> list[str]:
    return capflow_command(input=data.path, output=out, api_url=server.base_url, **overrides)


def faults(ctx: Context) -> ScenarioResult:
    """The same run without and with injected faults: how much longer do faults make it?"""
    rows = ctx.size(2000)
    res = ScenarioResult("faults", f"{rows} rows, latency 0.5 s, 64 in flight, timeout 5 s; "
                         "fault-free, then 10% 429, 5% 500, 1% hang, 1% malformed")
    data = dataset(ctx.cache_root, rows)
    walls = {}
    for label, fault_rates in (("fault-free", None), ("faults", FAULTS)):
        d = ctx.rundir("faults", label)
        with Server(0.5, faults=fault_rates, retry_after=1, hang_seconds=30, log_dir=d) as srv:
            cmd = _command(data, d / "out.jsonl", srv, max_workers=64, timeout=5,
                           **{"cache.enabled": "false"})
            run = run_measured(cmd, d)
            stats = srv.stats()
        walls[label] = run.wall
        res.add(output_check(f"output, {label}", verify(d / "out.jsonl", data), run),
                info(f"wall time, {label} (s)", f"{run.wall:.2f}"))
        if fault_rates:
            injected = {k: v for k, v in stats["faults"].items() if v}
            res.add(
                info("retries (capflow summary)",
                     f"{run.summary.get('retries', math.nan):.0f} "
                     f"({run.summary.get('requests', math.nan):.0f} requests sent)"),
                info("faults injected (server)", ", ".join(
                    f"{k}: {v}" for k, v in injected.items()) + f" = {sum(injected.values())}"),
                info("server statuses", ", ".join(f"{k}: {v}" for k, v in
                                                  stats["statuses"].items())),
            )
    res.add(at_most("wall time ratio, faults / fault-free", walls["faults"] / walls["fault-free"],
                    2.0, timing=True))
    return res


def journal_rows(output: Path) -> int:
    """Rows committed as done in ``output``'s journal."""
    path = output.with_name(output.name + ".journal.sqlite")
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM rows WHERE ok=1").fetchone()[0]


def first_request_then(server: Server, delay: float, limit: float = 120.0) -> Callable[
        [float], float]:
    """A ``kill_after`` for :func:`run_measured`: ``delay`` seconds after the server sees the
    client's first request (polled every 20 ms), or at ``limit`` if it never comes."""

    def kill_after(started: float) -> float:
        while server.stats()["requests_total"] == 0 and time.monotonic() - started < limit:
            time.sleep(0.02)
        return time.monotonic() - started + delay

    return kill_after


def kill(ctx: Context) -> ScenarioResult:
    """SIGKILL a run part way, run the same command again: complete output, little resent?

    The kill comes at a random moment between 20% and 80% of the run's expected request
    phase (ideal duration: full waves of requests), counted from its first request, so that
    requests are always in flight when it lands whatever capflow's start-up takes.
    """
    rows, workers, latency = ctx.size(2000), 64, 0.2
    res = ScenarioResult("kill", f"{rows} rows, latency {latency} s, {workers} in flight; "
                         "kill -9 mid-run, then the same command again")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("kill")
    ideal = math.ceil(rows / workers) * latency
    fraction = ctx.rng.uniform(0.2, 0.8)
    with Server(latency, log_dir=d) as srv:
        cmd = _command(data, d / "out.jsonl", srv, max_workers=workers,
                       **{"cache.path": d / "responses.sqlite"})
        first = run_measured(cmd, d, label="killed",
                             kill_after=first_request_then(srv, fraction * ideal))
        committed = journal_rows(d / "out.jsonl")
        ok_at_kill = srv.stats()["responses_ok"]
        second = run_measured(cmd, d, label="rerun")
        stats = srv.stats()
    res.add(
        check("first run killed", f"SIGKILL at {first.wall:.2f} s, {fraction:.0%} into the "
              f"{ideal:.1f} s request phase; exit {first.returncode}", "killed mid-run",
              first.returncode == -9),
        info("rows committed before the kill", f"{committed}"),
        info("server responses ok before the kill", f"{ok_at_kill}"),
        info("rerun: rows skipped / requests sent",
             f"{second.summary.get('skipped', math.nan):.0f} / "
             f"{second.summary.get('requests', math.nan):.0f}"),
        info("rerun wall time (s)", f"{second.wall:.2f}"),
        output_check("output after the rerun", verify(d / "out.jsonl", data), second),
        at_most(f"server responses ok, total (rows + {workers})", stats["responses_ok"],
                rows + workers, "{:.0f}"),
    )
    return res


def rerun(ctx: Context) -> ScenarioResult:
    """Run, then run the identical command again: the rerun must send nothing, fast."""
    rows, workers = ctx.size(5000), 256
    res = ScenarioResult("rerun", f"{rows} rows, latency 0.01 s, {workers} in flight; "
                         "a run, then the identical command again")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("rerun")
    with Server(0.01, log_dir=d) as srv:
        cmd = _command(data, d / "out.jsonl", srv, max_workers=workers,
                       **{"cache.path": d / "responses.sqlite"})
        first = run_measured(cmd, d, label="first")
        first_verdict = verify(d / "out.jsonl", data)
        sent_first = srv.stats()["requests_total"]
        second = run_measured(cmd, d, label="rerun")
        sent_rerun = srv.stats()["requests_total"] - sent_first
    res.add(
        output_check("output, first run", first_verdict, first),
        info("first run wall time (s)", f"{first.wall:.2f}"),
        info("first run requests (server)", f"{sent_first}"),
        output_check("output, rerun", verify(d / "out.jsonl", data), second),
        at_most("rerun requests (server)", sent_rerun, 0, "{:.0f}"),
        at_most("rerun wall time (s)", second.wall, 5.0),
    )
    return res


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """Most of the sorted ``times`` falling in any half-open interval ``window`` long."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def rpm(ctx: Context) -> ScenarioResult:
    """rpm=600 against a server that answers 429 above 600/min: paced, no bursts, no 429s."""
    rows, limit = ctx.size(1000, 200), 600
    res = ScenarioResult("rpm", f"{rows} rows, rpm={limit}, server --rpm-limit {limit}, "
                         "latency 0, 64 in flight")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("rpm")
    with Server(0.0, rpm_limit=limit, log_dir=d) as srv:
        cmd = _command(data, d / "out.jsonl", srv, max_workers=64, rpm=limit,
                       **{"cache.enabled": "false"})
        run = run_measured(cmd, d)
        log = srv.log()
    times = [t for t, _ in log]
    span = times[-1] - times[0] if len(times) > 1 else math.nan
    rate = (len(times) - 1) / span * 60 if span else math.nan
    res.add(
        output_check("output", verify(d / "out.jsonl", data), run),
        info("wall time (s)", f"{run.wall:.2f}"),
        info("requests (server) / retries (capflow)",
             f"{len(times)} / {run.summary.get('retries', math.nan):.0f}"),
        at_most("max requests in any 1-s window", max_in_window(times), 15, "{:.0f}"),
        check("average rate (requests/min)", f"{rate:.1f}", f"{limit} +/- 5%",
              abs(rate - limit) <= 0.05 * limit),
        at_most("429 responses", sum(s == 429 for _, s in log), 0, "{:.0f}"),
    )
    return res
