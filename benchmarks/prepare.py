"""The prepare scenarios: how fast capflow readies big photos, and whether requests keep flowing.

200 synthetic 4000x3000 JPEG photos (quality 90, with shapes, texture and sensor noise, so
they compress like real ones) are made once and cached.

``prepare``: capflow's dry run over them against this machine's bare Pillow decode rate on all
cores, with ``draft`` (the JPEG decoder scaling by 1/2 as it decodes) and naively (full decode,
then resize by 1/2). The bare rate is measured just before and just after capflow's run, and
the higher of the two is the one compared, so a machine that speeds up or slows down midway
does not flatter capflow.

``prepare-live``: the photos captioned for real against a server with 2 s latency. Requests
should go out as fast as images are prepared, and the requests in flight should hold steady
(about the preparation rate times the latency) rather than collapse while decoding runs.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageStat

from benchmarks.context import Context
from benchmarks.harness import Server, capflow_command, run_measured
from benchmarks.report import ScenarioResult, at_least, at_most, check, info
from benchmarks.throughput import RSS_LIMIT_MB

SIZE = (4000, 3000)
QUALITY = 90


def make_photo(path: Path, seed: int) -> None:
    """Write a photo-like JPEG: smooth colour regions, shapes, texture, grain."""
    rng = np.random.default_rng(seed)
    w, h = SIZE
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = base.resize(SIZE, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(40):  # objects with hard edges
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = (int(v) for v in rng.integers(20, 900, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + dx, y + dy), fill=fill)
    photo = base
    for scale, sigma in ((24, 20.0), (3, 10.0)):  # surface texture at two scales
        field = rng.normal(128, sigma, (h // scale, w // scale, 3)).clip(0, 255)
        layer = Image.fromarray(field.astype(np.uint8)).resize(SIZE, Image.Resampling.BILINEAR)
        photo = ImageChops.add(photo, layer, offset=-128)
    grain = Image.fromarray(rng.integers(124, 133, (h, w, 3), dtype=np.uint8))  # sensor noise
    tmp = path.with_name(path.name + ".tmp")
    ImageChops.add(photo, grain, offset=-128).save(tmp, "JPEG", quality=QUALITY)
    tmp.rename(path)


def _make_photo(args: tuple[Path, int]) -> None:
    make_photo(*args)


def photos(cache_root: Path, count: int) -> Path:
    """A dataset of ``count`` photos (made on first use, on all cores); returns its JSON."""
    folder = cache_root / f"photos-{SIZE[0]}x{SIZE[1]}-q{QUALITY}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:03d}.jpg" for i in range(count)]
    missing = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        print(f"   (making {len(missing)} photos in {folder}, once)", flush=True)
        with Pool(os.cpu_count()) as pool:
            pool.map(_make_photo, missing, chunksize=1)
    data = folder / f"data-{count}.json"
    rows = [{"id": f"{i:06d}", "image": [f"./{p.name}"]} for i, p in enumerate(paths)]
    data.write_text(json.dumps(rows, indent=1))
    return data


def decode_draft(path: Path) -> None:
    """Decode a JPEG at half size, letting the decoder scale (``Image.draft``)."""
    with Image.open(path) as img:
        img.draft("RGB", (img.width // 2, img.height // 2))
        img.load()


def decode_naive(path: Path) -> None:
    """Decode a JPEG at full size, then resize it by half."""
    with Image.open(path) as img:
        img.load()
        img.resize((img.width // 2, img.height // 2))


def pool_rate(fn: Callable[[Path], None], paths: list[Path]) -> float:
    """Images per second decoding ``paths`` with ``fn`` on all cores."""
    with Pool(os.cpu_count()) as pool:
        pool.map(abs, range(os.cpu_count() or 1))  # workers up before the clock starts
        began = time.perf_counter()
        pool.map(fn, paths, chunksize=1)
        return len(paths) / (time.perf_counter() - began)


def photo_set(ctx: Context, count: int) -> tuple[Path, list[Path]]:
    """The dataset of ``count`` photos (made once) and the photos' paths, in row order."""
    data = photos(ctx.cache_root, count)
    return data, [data.parent / row["image"][0] for row in json.loads(data.read_text())]


def photo_means(paths: list[Path]) -> np.ndarray:
    """Mean RGB colour of each photo (decoded at 1/8 scale: the mean barely moves)."""
    with Pool(os.cpu_count()) as pool:
        return np.array(pool.map(_mean_colour, paths, chunksize=4))


def _mean_colour(path: Path) -> list[float]:
    with Image.open(path) as img:
        img.draft("RGB", (img.width // 8, img.height // 8))
        return ImageStat.Stat(img.convert("RGB")).mean


def prepare(ctx: Context) -> ScenarioResult:
    """capflow's dry run over big photos against the machine's bare decode rates."""
    count = ctx.size(200)
    res = ScenarioResult("prepare", f"dry run over {count} photos {SIZE[0]}x{SIZE[1]} "
                         f"JPEG q{QUALITY}, vs bare Pillow decode on {os.cpu_count()} cores")
    data, paths = photo_set(ctx, count)
    raw = sum(p.stat().st_size for p in paths)
    for p in paths:  # into the page cache, for every contender alike
        p.read_bytes()
    d = ctx.rundir("prepare")
    before = pool_rate(decode_draft, paths)
    run = run_measured(capflow_command(input=data, dry_run="true",
                                       **{"cache.path": d / "responses.sqlite"}), d)
    after = pool_rate(decode_draft, paths)
    draft, naive = max(before, after), pool_rate(decode_naive, paths)
    s = run.summary
    if "done" not in s or "image_mb" not in s:
        res.notes.append("capflow's summary lines were not found: " + run.brief())
    ready, failed = s.get("done", 0), s.get("failed", math.nan)
    rate = s.get("images", math.nan) / s.get("elapsed", math.nan)
    sent = s.get("image_mb", math.nan) * 1e6
    res.add(
        check("dry run", f"{ready:.0f} ready, {failed:.0f} would fail; exit {run.returncode}",
              "all ready, exit 0", ready == count and failed == 0 and run.returncode == 0),
        info("capflow rate (images/s)", f"{rate:.2f} (whole process: {count / run.wall:.2f})"),
        info("bare draft decode rate (images/s)", f"{draft:.2f} (before {before:.2f}, "
             f"after {after:.2f})"),
        info("naive decode + resize rate (images/s)", f"{naive:.2f}"),
        at_least("capflow rate / bare draft rate", rate / draft, 0.70, timing=True),
        at_least("capflow rate / naive rate", rate / naive, 2.0, timing=True),
        info("image bytes to send / raw (MB)", f"{sent / 1e6:.1f} / {raw / 1e6:.1f}"),
        at_most("bytes to send / raw bytes", sent / raw, 0.10, "{:.3f}"),
        at_most("capflow peak RSS (MB)", run.max_rss_mb, RSS_LIMIT_MB, "{:.1f}"),
    )
    return res


LIVE_LATENCY = 2.0
LIVE_WORKERS = 128


def prepare_live(ctx: Context) -> ScenarioResult:
    """The photos captioned against a slow server: in flight while preparing."""
    count = ctx.size(200, 40)
    res = ScenarioResult("prepare-live", f"{count} photos {SIZE[0]}x{SIZE[1]} captioned, "
                         f"{LIVE_WORKERS} in flight at most, latency {LIVE_LATENCY} s")
    data, paths = photo_set(ctx, count)
    means = photo_means(paths)
    d = ctx.rundir("prepare-live")
    with Server(LIVE_LATENCY, log_dir=d) as srv:
        run = run_measured(capflow_command(input=data, output=d / "out.jsonl",
                                           api_url=srv.base_url, max_workers=LIVE_WORKERS,
                                           **{"cache.enabled": "false"}), d)
        log = [t for t, status in srv.log() if status == 200]
    own, worst = _check_captions(d / "out.jsonl", means, "1264x948")
    res.add(
        check("output", f"{own}/{count} rows captioned from their own photo (1264x948, colour "
              f"within {worst:.1f} of it); exit {run.returncode}", "all rows, exit 0",
              own == count and run.returncode == 0),
        info("elapsed (s)", f"{run.wall:.2f}"),
    )
    if len(log) < 2:
        res.notes.append("too few requests reached the server: " + run.brief())
        return res
    # Steady state: from the first reply (the pipeline is full) to the last request sent.
    start, end = log[0] + LIVE_LATENCY, log[-1]
    if end - start < 1.0:
        res.notes.append("no steady state to measure: every request went out within the "
                         "first latency period")
        return res
    rate = sum(start <= t <= end for t in log) / max(end - start, 1e-9)
    samples = [sum(t <= x < t + LIVE_LATENCY for t in log)
               for x in np.arange(start, end, 0.1)] or [0]
    mean = float(np.mean(samples))
    res.add(
        info("requests sent per second (steady state)", f"{rate:.2f}"),
        info("in flight: mean / min / max (steady state, 0.1 s samples)",
             f"{mean:.1f} / {min(samples)} / {max(samples)}"),
        info("expected in flight (rate x latency)", f"{rate * LIVE_LATENCY:.1f}"),
        at_least("min in flight / mean in flight", min(samples) / max(mean, 1e-9), 0.5,
                 timing=True),
        at_most("capflow peak RSS (MB)", run.max_rss_mb, RSS_LIMIT_MB, "{:.1f}"),
    )
    return res


def _check_captions(output: Path, means: np.ndarray, size: str) -> tuple[int, float]:
    """Rows captioned with the expected size and a colour within 2 (of 255, per channel) of
    their own photo's mean colour; and the largest such distance seen."""
    own, worst = 0, 0.0
    try:
        rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return 0, math.nan
    for row in rows:
        try:
            index, (got_size, colour) = int(row["id"]), row["caption"].split(" #")
            rgb = np.array([int(colour[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)
            distance = float(np.abs(means[index] - rgb).max())
        except (KeyError, IndexError, ValueError, AttributeError):
            continue
        if got_size == size and distance <= 2.0:
            own += 1
            worst = max(worst, distance)
    return own, worst
