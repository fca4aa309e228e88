"""``python -m benchmarks [scenario ...] [--quick] [--with-reference]``: run, print, judge."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import capflow
from benchmarks.context import Context
from benchmarks.harness import machine_cpu_seconds, own_cpu_seconds
from benchmarks.report import ScenarioResult, render, render_overview
from benchmarks.scenarios import DESCRIPTIONS, SCENARIOS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    listing = "\n".join(f"  {name:<16} {text}" for name, text in DESCRIPTIONS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End-to-end benchmarks of capflow against the fake OpenAI server.",
        epilog=f"scenarios (default: all, in this order):\n{listing}")
    p.add_argument("scenarios", nargs="*", metavar="scenario", help="scenarios to run")
    p.add_argument("--quick", action="store_true",
                   help="about a tenth of the rows: a smoke run (timing targets not judged)")
    p.add_argument("--with-reference", action="store_true",
                   help="run the reference client beside capflow in throughput scenarios")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "capflow-bench-cache",
                   help="where generated datasets are kept between runs (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (outputs, logs)")
    p.add_argument("--seed", type=int, help="seed of random choices (e.g. the kill moment)")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def code_version() -> str:
    """The commit capflow runs from, and whether its code differs from it."""
    root = Path(capflow.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "capflow", "conf")
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return (head or "unknown commit") + (" + uncommitted changes to capflow/ or conf/"
                                         if dirty else "")


def compile_capflow() -> None:
    """Byte-compile capflow's modules, as an installed wheel's are: an editable install run
    with PYTHONDONTWRITEBYTECODE set would otherwise compile them afresh in every client."""
    import compileall

    compileall.compile_dir(Path(capflow.__file__).resolve().parent, quiet=1)


def run_one(name: str, ctx: Context) -> ScenarioResult:
    """Run scenario ``name``; an exception becomes a failed result, not the end of the run."""
    began, machine, own = time.monotonic(), machine_cpu_seconds(), own_cpu_seconds()
    try:
        result = SCENARIOS[name](ctx)
    except Exception as exc:
        traceback.print_exc()
        result = ScenarioResult(name, "did not complete", error=f"{type(exc).__name__}: {exc}")
    took = time.monotonic() - began
    others = (machine_cpu_seconds() - machine) - (own_cpu_seconds() - own)
    result.notes.append(
        f"scenario took {took:.0f} s; other processes on the machine used {max(0, others):.0f}"
        f" CPU-s meanwhile ({max(0, others) / took / (os.cpu_count() or 1):.0%} of it)")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; 0 when every target is met, 1 otherwise."""
    args = parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    workdir = Path(tempfile.mkdtemp(prefix="capflow-bench-"))
    ctx = Context(args.quick, args.with_reference, workdir, args.cache_dir, args.seed)
    compile_capflow()
    print(f"capflow {capflow.__version__} ({code_version()}) benchmarks"
          f"{' (--quick)' if args.quick else ''}: {', '.join(names)}\n"
          f"  Python {platform.python_version()}, {os.cpu_count()} cores;"
          f" work dir {workdir}; datasets in {args.cache_dir}\n", flush=True)
    results = []
    for name in names:
        results.append(run_one(name, ctx))
        print(render(results[-1], args.quick) + "\n", flush=True)
    print(render_overview(results, args.quick))
    failed = any(not r.passed(args.quick) for r in results)
    if args.keep or failed:
        print(f"work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
