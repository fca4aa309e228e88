"""Scenarios of a server that pushes back: a rate limit nobody configured, a few slots with a
queue behind them, every request failing, an outage in the middle of a run. capflow runs with
its defaults (no ``rpm``, ``max_workers`` too high): it must adapt by itself."""

from __future__ import annotations

import math
import re
import threading
import time

from benchmarks.context import Context
from benchmarks.datasets import dataset, verify
from benchmarks.harness import Server, run_measured
from benchmarks.report import ScenarioResult, at_most, check, info
from benchmarks.resilience import _command, max_in_window, output_check

FAILURE = "image input is not supported - hint: if this is unexpected, you may need to provide" \
          " the mmproj"


def rate_limit(ctx: Context) -> ScenarioResult:
    """A server enforcing 1,200 requests/min (429 + Retry-After), no ``rpm`` set."""
    rows, limit, workers = ctx.size(300, 100), 1200, 32
    res = ScenarioResult("rate-limit", f"{rows} rows, server --rpm-limit {limit} (429 with "
                         f"Retry-After: 1 above {limit // 60} a second), max_workers={workers},"
                         " no rpm set")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("rate-limit")
    with Server(0.0, rpm_limit=limit, log_dir=d) as srv:
        run = run_measured(_command(data, d / "out.jsonl", srv, max_workers=workers,
                                    **{"cache.enabled": "false"}), d)
        log = srv.log()
    ideal = rows / (limit / 60)
    first, last = (log[0][0], log[-1][0]) if log else (math.nan, math.nan)
    refused = sum(s == 429 for _, s in log)
    res.add(
        output_check("output", verify(d / "out.jsonl", data), run),
        info("requests (server): answered / refused with 429", f"{len(log) - refused} /"
             f" {refused}"),
        at_most("requests per row", len(log) / rows, 2.0),
        info("first to last request (s)", f"{last - first:.2f} (ideal {ideal:.1f})"),
        at_most("wall time / ideal", run.wall / ideal, 1.5, timing=True),
        info("wall time (s)", f"{run.wall:.2f}"),
        info("most requests in any 1-s window", f"{max_in_window([t for t, _ in log])}"),
        info("capflow's summary", _sending_line(run.stdout)),
    )
    return res


def slots(ctx: Context) -> ScenarioResult:
    """A server with 4 slots of 0.1 s (the rest queue), ``max_workers=64``, ``timeout=1``."""
    rows, workers = ctx.size(400, 100), 64
    res = ScenarioResult("slots", f"{rows} rows, server --slots 4 --latency 0.1 (the rest wait"
                         f" in line), max_workers={workers}, timeout=1")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("slots")
    with Server(0.1, slots=4, log_dir=d) as srv:
        run = run_measured(_command(data, d / "out.jsonl", srv, max_workers=workers, timeout=1,
                                    **{"cache.enabled": "false"}), d)
        stats = srv.stats()
    ideal = rows / 4 * 0.1
    res.add(
        output_check("output", verify(d / "out.jsonl", data), run),
        at_most("requests per row", stats["requests_total"] / rows, 1.25),
        info("server statuses (499: the client gave up)", ", ".join(
            f"{k}: {v}" for k, v in stats["statuses"].items())),
        info("server max in flight", f"{stats['max_in_flight']} (of {workers})"),
        at_most("wall time / ideal", run.wall / ideal, 2.0, timing=True),
        info("wall time (s)", f"{run.wall:.2f} (ideal {ideal:.1f})"),
        info("capflow's summary", _sending_line(run.stdout)),
    )
    return res


def failing(ctx: Context) -> ScenarioResult:
    """Every request fails with the same 500 (a model without vision): the run stops itself."""
    rows = ctx.size(200, 200)
    res = ScenarioResult("failing", f"{rows} rows, every request answered 500 '{FAILURE[:40]}...'"
                         ", defaults (max_workers=10, stop.outage_s=60)")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("failing")
    with Server(0.0, failure=(500, FAILURE), log_dir=d) as srv:
        run = run_measured(_command(data, d / "out.jsonl", srv), d)
        sent = srv.stats()["requests_total"]
    stopped = [line for line in run.stderr.splitlines() if "stopped early" in line]
    res.add(
        check("exit status", f"{run.returncode}", "1", run.returncode == 1),
        at_most("requests sent (server)", sent, 40, "{:.0f}"),
        check("one line naming the server's message", stopped[0][:150] if stopped else "none",
              "1 line", len(stopped) == 1 and "image input is not supported" in stopped[0]),
        info("wall time (s)", f"{run.wall:.2f}"),
    )
    return res


def outage(ctx: Context) -> ScenarioResult:
    """A 20 s outage (every request 503) in the middle of a run: ridden out, every row done."""
    rows, workers, latency, down = ctx.size(1200, 300), 16, 0.5, 20.0
    res = ScenarioResult("outage", f"{rows} rows, latency {latency} s, max_workers={workers};"
                         f" every request answered 503 for {down:.0f} s mid-run")
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("outage")
    with Server(latency, log_dir=d) as srv:
        def outage_thread() -> None:
            while srv.stats()["responses_ok"] < rows // 4:
                time.sleep(0.05)
            srv.fail(503, "upstream connect error or disconnect/reset before headers")
            time.sleep(down)
            srv.fail(None)

        thread = threading.Thread(target=outage_thread, daemon=True)
        thread.start()
        run = run_measured(_command(data, d / "out.jsonl", srv, max_workers=workers,
                                    **{"cache.enabled": "false"}), d)
        thread.join(1)
        stats = srv.stats()
    ideal = math.ceil(rows / workers) * latency + down
    res.add(
        output_check("output", verify(d / "out.jsonl", data), run),
        info("503s answered (server)", f"{stats['statuses'].get('503', 0)}"),
        info("wall time (s)", f"{run.wall:.2f} (ideal {ideal:.1f}, the outage included)"),
        info("capflow's summary", _sending_line(run.stdout)),
    )
    return res


def _sending_line(stdout: str) -> str:
    m = re.search(r"^\s*sending\s+(.*)$", stdout, re.M)
    return m.group(1) if m else "(no adaptation reported)"
