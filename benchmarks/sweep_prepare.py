"""The sweep-prepare scenario: a sweep's jobs prepare each photo once.

The 200 photos of the prepare scenarios (4000x3000 JPEG) are captioned by one job
(``prompt=concise``), then by a three-prompt sweep (``-m prompt=concise,detailed,alt_text``)
with a fresh cache folder, then by the same sweep with ``image.cache=false`` for contrast.
Each run works in its own folder, so no run's response cache answers for another; the jobs of
a sweep ask different prompts, so every job sends every request. The figure is the client's
CPU (user+sys): with the prepared-image cache a sweep decodes each photo once, and its later
jobs cost about what sending does.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from benchmarks.context import Context
from benchmarks.harness import RunResult, Server, capflow_command, run_measured
from benchmarks.prepare import SIZE, _check_captions, photo_means, photo_set
from benchmarks.report import Figure, ScenarioResult, at_most, check, info

PROMPTS = ("concise", "detailed", "alt_text")
LATENCY = 0.05


def sweep_prepare(ctx: Context) -> ScenarioResult:
    """One job, then a three-prompt sweep with and without the image cache: client CPU."""
    count = ctx.size(200, 40)
    res = ScenarioResult("sweep-prepare", f"{count} photos {SIZE[0]}x{SIZE[1]}: one job, then "
                         f"a {len(PROMPTS)}-prompt sweep (image cache on, then off)")
    data, paths = photo_set(ctx, count)
    means = photo_means(paths)
    for p in paths:  # into the page cache, for every run alike
        p.read_bytes()
    runs: dict[str, RunResult] = {}
    for label, prompts, overrides in (("one job", "concise", {}),
                                      ("sweep", ",".join(PROMPTS), {}),
                                      ("sweep uncached", ",".join(PROMPTS),
                                       {"image.cache": "false"})):
        d = ctx.rundir("sweep-prepare", label.replace(" ", "-"))
        runs[label], output = _run(d, data, count, means, prompts, **overrides)
        res.add(output)
        if label == "sweep":
            cached = _entries(d / "cache_local" / "images.sqlite")
            res.add(check("images in the cache after the sweep", f"{cached}", f"{count}",
                          cached == count))
    one, sweep, uncached = runs["one job"], runs["sweep"], runs["sweep uncached"]
    res.add(
        info("one-job client CPU, s (wall)", f"{one.cpu:.2f} ({one.wall:.2f})"),
        info("sweep client CPU, s (wall)", f"{sweep.cpu:.2f} ({sweep.wall:.2f})"),
        at_most("sweep CPU / one-job CPU", sweep.cpu / one.cpu, 1.5, timing=True),
        info("sweep CPU / one-job CPU, image.cache=false",
             f"{uncached.cpu / one.cpu:.2f} ({uncached.cpu:.2f} s CPU, {uncached.wall:.2f} wall)"),
        info("client peak RSS, MB: one job / sweep / sweep uncached",
             f"{one.max_rss_mb:.1f} / {sweep.max_rss_mb:.1f} / {uncached.max_rss_mb:.1f}"),
    )
    return res


def _run(d: Path, data: Path, count: int, means: np.ndarray, prompts: str,
         **overrides: object) -> tuple[RunResult, Figure]:
    """capflow over the photos in folder ``d`` (a sweep when ``prompts`` lists several); the
    run, and whether every job captioned every row from its own photo."""
    jobs = prompts.count(",") + 1
    with Server(LATENCY, log_dir=d) as srv:
        argv = capflow_command(input=data, output="out.jsonl", api_url=srv.base_url,
                               prompt=prompts, **overrides)
        if jobs > 1:
            argv[1:1] = ["-m", "hydra.sweep.dir=jobs"]
        run = run_measured(argv, d)
        requests = srv.stats()["requests_total"]
    outputs = sorted((d / "jobs").rglob("out.jsonl")) if jobs > 1 else [d / "out.jsonl"]
    own = [_check_captions(out, means, "1264x948")[0] for out in outputs]
    ok = (len(outputs) == jobs and all(n == count for n in own) and run.returncode == 0
          and requests == jobs * count)
    return run, check(f"output, {d.name}", f"{sum(own)}/{jobs * count} rows of {len(outputs)}"
                      f" job(s) captioned from their own photo; {requests} requests; exit"
                      f" {run.returncode}", "all rows, exit 0", ok)


def _entries(path: Path) -> int:
    """Images held by the cache file at ``path`` (0 if it cannot be read)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.Error:
        return 0
