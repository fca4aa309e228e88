"""The scenarios by name, in the order ``python -m benchmarks`` runs them."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from benchmarks.adaptive import failing, outage, rate_limit, slots
from benchmarks.context import Context
from benchmarks.llama import llama_images, llama_slots
from benchmarks.prepare import prepare, prepare_live
from benchmarks.report import ScenarioResult
from benchmarks.resilience import faults, kill, rerun, rpm
from benchmarks.sweep_prepare import sweep_prepare
from benchmarks.throughput import reference_alone, throughput

Scenario = Callable[[Context], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    "faults": faults,
    "kill": kill,
    "rerun": rerun,
    "rpm": rpm,
    "rate-limit": rate_limit,
    "slots": slots,
    "failing": failing,
    "outage": outage,
    "llama-slots": llama_slots,
    "llama-images": llama_images,
    "throughput-1024": partial(throughput, name="throughput-1024"),
    "throughput-256": partial(throughput, name="throughput-256"),
    "memory": partial(throughput, name="memory"),
    "reference": reference_alone,
    "prepare": prepare,
    "prepare-live": prepare_live,
    "sweep-prepare": sweep_prepare,
}

DESCRIPTIONS = {
    "faults": "2,000 rows without, then with 429/500/hang/malformed faults: wall-time ratio",
    "kill": "2,000 rows, kill -9 mid-run, rerun: complete output, little sent twice",
    "rerun": "5,000 rows, then the identical command: no request, under 5 s",
    "rpm": "1,000 rows at rpm=600 against a 600/min server: pacing, no 429",
    "rate-limit": "300 rows against a 1,200/min server, no rpm set: the rate is learned",
    "slots": "400 rows, 64 workers, a server with 4 slots of 0.1 s: the limit adapts",
    "failing": "200 rows, every request a 500: the run stops itself within 40 requests",
    "outage": "1,200 rows with a 20 s outage mid-run: ridden out",
    "llama-slots": "200 text rows, 64 workers, llama.cpp with 4 slots (optional: xllamacpp)",
    "llama-images": "200 image rows to a text-only llama.cpp: its 500 stops the run",
    "throughput-1024": "10,000 rows, 1024 in flight, latency 2 s",
    "throughput-256": "5,000 rows, 256 in flight, latency 1 s",
    "memory": "100,000 rows, 256 in flight, latency 0.05 s: peak RSS",
    "reference": "the plain ThreadPoolExecutor + openai client alone (throughput-256 load)",
    "prepare": "dry run over 200 4000x3000 JPEGs vs bare Pillow decode; bytes to send",
    "prepare-live": "the 200 JPEGs captioned at 2 s latency: requests in flight hold steady",
    "sweep-prepare": "the 200 JPEGs, one job vs a 3-prompt sweep: each photo prepared once",
}
