"""capflow-metrics through the real ``capflow`` command, against the kit's loopback server."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from PIL import Image
from promtext import parse, value

ROWS = 8


def make_dataset(folder: Path, rows: int = ROWS) -> str:
    """``rows`` small images of different colours and a JSON Lines dataset naming them."""
    lines = []
    for i in range(rows):
        Image.new("RGB", (24, 16), (i * 30 % 256, 80, 160)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png"}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return "data.jsonl"


def run_args(server, output: str, *more: str) -> list[str]:  # noqa: ANN001
    return ["input=data.jsonl", f"output={output}", f"api_url={server.base_url}",
            "model_name=m", *more]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_and_textfile_of_a_run(openai_server, capflow_cli, tmp_path):
    make_dataset(tmp_path)
    openai_server.latency = 0.02
    result = capflow_cli(*run_args(openai_server, "out.jsonl", "+metrics=files",
                                   "metrics.dir=m/", "+metrics.labels.job=nightly"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["out.prom", "out.rows.jsonl"]

    rows = read_rows(tmp_path / "m" / "out.rows.jsonl")
    assert sorted(r["index"] for r in rows) == list(range(ROWS))
    for r in rows:
        assert r["status"] == "ok" and r["error_type"] is None
        assert r["attempts"] == 1 and r["cached"] is False
        assert 0 <= r["queued"] <= r["sent"] <= r["answered"] <= r["finished"] < 30
        assert r["answer_s"] >= 0.02  # the server's latency
        assert r["total_s"] >= r["wait_s"] + r["answer_s"] - 1e-5
    assert len({r["run"] for r in rows}) == 1

    families = parse((tmp_path / "m" / "out.prom").read_text())
    assert value(families, "capflow_rows_total", status="ok") == ROWS
    assert value(families, "capflow_rows_total", status="failed") == 0
    assert value(families, "capflow_rows_total", status="skipped") == 0
    assert value(families, "capflow_requests_total") == len(openai_server.requests) == ROWS
    assert value(families, "capflow_retries_total") == 0
    assert value(families, "capflow_cache_hits_total") == 0
    assert value(families, "capflow_tokens_total", kind="prompt") > 0
    assert value(families, "capflow_run_success") == 1
    assert value(families, "capflow_rows_per_second") > 0
    assert "capflow_row_errors_total" not in families  # no failure, no error type
    assert families["capflow_row_latency_seconds"].kind == "summary"
    answers = [r["answer_s"] for r in rows]
    assert value(families, "capflow_row_latency_seconds_count", phase="answer") == ROWS
    assert math.isclose(value(families, "capflow_row_latency_seconds_sum", phase="answer"),
                        sum(answers), abs_tol=1e-5)
    p50 = value(families, "capflow_row_latency_seconds", phase="answer", quantile="0.5")
    assert math.isclose(p50, statistics.median(answers), abs_tol=1e-5)
    p99 = value(families, "capflow_row_latency_seconds", phase="total", quantile="0.99")
    assert p99 <= max(r["total_s"] for r in rows) + 1e-5
    for family in families.values():  # every sample carries the run's labels
        for _, labels, _ in family.samples:
            assert labels["output"] == "out.jsonl" and labels["job"] == "nightly"

    # The same rows into a new output: the response cache answers every one.
    result = capflow_cli(*run_args(openai_server, "again.jsonl", "+metrics=files",
                                   "metrics.dir=m/"))
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "m" / "again.rows.jsonl")
    assert len(rows) == ROWS
    assert all(r["cached"] and r["attempts"] == 0 and r["sent"] is None for r in rows)
    families = parse((tmp_path / "m" / "again.prom").read_text())
    assert value(families, "capflow_cache_hits_total") == ROWS
    assert value(families, "capflow_requests_total") == 0
    assert math.isnan(value(families, "capflow_row_latency_seconds", phase="answer",
                            quantile="0.9"))


def test_failures_by_error_type_and_retries(openai_server, capflow_cli, tmp_path):
    make_dataset(tmp_path)
    openai_server.set_faults(rate_500=0.5, seed=1)
    no_retry = ("retry.max_attempts=1", "cache.enabled=false")
    result = capflow_cli(*run_args(openai_server, "out.jsonl", "+metrics=files", *no_retry))
    assert result.returncode == 1  # rows failed
    failed = sum(r.status == 500 for r in openai_server.requests)
    assert 0 < failed < ROWS

    rows = read_rows(tmp_path / "metrics" / "out.rows.jsonl")
    assert len(rows) == ROWS
    bad = [r for r in rows if r["status"] == "failed"]
    assert len(bad) == failed
    assert {(r["error_type"], r["error_stage"]) for r in bad} == {("ServerError", "request")}
    assert all(r["answered"] is None and r["answer_s"] is None for r in bad)
    families = parse((tmp_path / "metrics" / "out.prom").read_text())
    assert value(families, "capflow_rows_total", status="failed") == failed
    assert value(families, "capflow_rows_total", status="ok") == ROWS - failed
    assert value(families, "capflow_row_errors_total", type="ServerError") == failed
    assert value(families, "capflow_run_success") == 0

    # With retries, every row gets through; the retries are counted.
    openai_server.reset()
    openai_server.set_faults(rate_500=0.3, seed=2)
    result = capflow_cli(*run_args(openai_server, "retried.jsonl", "+metrics=files",
                                   "retry.max_attempts=8", "retry.initial_wait=0.01",
                                   "cache.enabled=false"))
    assert result.returncode == 0, result.stderr
    requests = len(openai_server.requests)
    assert requests > ROWS
    rows = read_rows(tmp_path / "metrics" / "retried.rows.jsonl")
    assert all(r["status"] == "ok" for r in rows)
    assert sum(r["attempts"] for r in rows) == requests
    families = parse((tmp_path / "metrics" / "retried.prom").read_text())
    assert value(families, "capflow_requests_total") == requests
    assert value(families, "capflow_retries_total") == requests - ROWS
    assert value(families, "capflow_row_attempts_total") == requests
    assert value(families, "capflow_rows_retried_total") == sum(r["attempts"] > 1 for r in rows)


def test_nothing_written_unless_asked(openai_server, capflow_cli, capflow_config, tmp_path):
    make_dataset(tmp_path)
    before = set(tmp_path.rglob("*"))
    result = capflow_cli(*run_args(openai_server, "out.jsonl"))
    assert result.returncode == 0, result.stderr
    new = set(tmp_path.rglob("*")) - before
    assert not [p for p in new if p.name.endswith((".prom", ".rows.jsonl"))]
    assert not (tmp_path / "metrics").exists()
    assert "metrics" not in capflow_config()
    assert capflow_config("+metrics=files").metrics.dir == "metrics"

    # Asked for, but a dry run (no api_url): nothing is sent and no metrics are written.
    result = capflow_cli("input=data.jsonl", "output=dry.jsonl", "+metrics=files")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "metrics").exists()


def test_unwritable_folder_never_stops_the_run(openai_server, capflow_cli, tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    result = capflow_cli(*run_args(openai_server, "out.jsonl", "+metrics=files",
                                   "metrics.dir=taken/m"))
    assert result.returncode == 0, result.stderr
    # capflow logs warnings to stdout, beside its summary
    [warning] = [line for line in result.stdout.splitlines() if "capflow-metrics" in line]
    assert "cannot make the folder taken/m" in warning
    assert warning.endswith("; no metrics are written for this run")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == ROWS


def test_a_sweep_writes_each_jobs_metrics_in_its_folder(openai_server, capflow_cli, tmp_path):
    make_dataset(tmp_path, rows=2)
    # ~hydra.callbacks.compare: no comparison of the jobs (its plot is the slow part of a sweep)
    result = capflow_cli("-m", *run_args(openai_server, "out.jsonl", "+metrics=files",
                                         "prompt=concise,detailed", "~hydra.callbacks.compare"))
    assert result.returncode == 0, result.stderr
    textfiles = sorted(tmp_path.glob("multirun/*/*/*/metrics/out.prom"))
    assert [p.parent.parent.name for p in textfiles] == ["prompt=concise", "prompt=detailed"]
    for path in textfiles:
        assert value(parse(path.read_text()), "capflow_rows_total", status="ok") == 2
