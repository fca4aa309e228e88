"""A run you can read: progress lines in logs, the manifest beside the output, Hydra's folder out
of the way (and gone when nothing ran), the dry run's first row."""

from __future__ import annotations

import json
import re
import subprocess
import time

from conftest import CAPFLOW, make_dataset, read_rows, run_capflow

from capflow.testing.server import FakeOpenAIServer


def test_progress_lines_go_to_a_log_now_and_then(tmp_path):
    data, _ = make_dataset(tmp_path, 60, name="data.jsonl")
    log = tmp_path / "stderr.log"
    with FakeOpenAIServer(latency=0.2) as server, open(log, "w") as err:
        began = time.monotonic()
        done = subprocess.run(
            [CAPFLOW, f"input={data}", f"output={tmp_path / 'o.jsonl'}",
             f"api_url={server.base_url}", "model_name=m", "max_workers=4",
             "progress_interval=1"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True, timeout=120)
        elapsed = time.monotonic() - began
    assert done.returncode == 0
    lines = [line for line in log.read_text().splitlines() if "rows/s" in line]
    assert len(lines) >= int(elapsed) - 2  # one a second, the last second or two aside
    assert re.search(r"\d+/60 rows \(\d+%\), [\d.]+ rows/s, ETA", lines[0])
    assert "tokens" in lines[-1] and "in flight" in lines[-1]


def test_progress_interval_defaults_to_ten_seconds_and_false_silences_it(tmp_path):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="capflow.conf", version_base=None):
        assert compose("config").progress_interval == 10
    data, _ = make_dataset(tmp_path, 20)
    with FakeOpenAIServer(latency=0.2) as server:
        quiet = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                            f"api_url={server.base_url}", "model_name=m", "max_workers=2",
                            "progress=false", "progress_interval=0.5", cwd=tmp_path)
    assert quiet.returncode == 0 and "rows/s" not in quiet.stderr


def test_every_run_leaves_a_manifest_that_agrees_with_its_output(tmp_path):
    data, rows = make_dataset(tmp_path, 12)
    (tmp_path / "images" / "00003.png").unlink()  # a row that fails at prepare
    out = tmp_path / "o.jsonl"
    args = [f"input={data}", f"output={out}", "model_name=m", "price.prompt_per_million=1",
            "price.completion_per_million=2"]
    with FakeOpenAIServer() as server:
        result = run_capflow(*args, f"api_url={server.base_url}", cwd=tmp_path)
        sent = server.stats()["requests_total"]
        first_record = json.loads((tmp_path / "o.jsonl.run.json").read_text())
        # A rerun finds every row in the journal: the manifest says so.
        again = run_capflow(*args, f"api_url={server.base_url}", "retry_failed=false",
                            cwd=tmp_path)
        assert server.stats()["requests_total"] == sent
    assert result.returncode == 1
    record = first_record
    written = read_rows(out)
    captioned = [r for r in written if "caption" in r]
    s = record["summary"]
    assert s["done"] == len(captioned) == 11 and s["failed"] == 1
    assert s["failed_by_type"] == {"ImageNotFound": 1}
    assert record["output_rows"] == {"captioned": 11, "failed": 1,
                                     "failed_by_type": {"ImageNotFound": 1}}
    assert s["requests"] == sent == 11 and s["retries"] == 0 and s["cache_hits"] == 0
    assert s["cost"] == round((s["prompt_tokens"] * 1 + s["completion_tokens"] * 2) / 1e6, 6)
    assert s["prompt_tokens"] > 0 and s["elapsed_s"] > 0 and s["skipped"] == 0
    assert record["status"] == "finished" and record["capflow"]
    assert record["command"][:2] == ["capflow", f"input={data}"]
    assert record["config"]["serving"]["model_name"] == "m"
    assert record["started"] <= record["ended"]
    assert "CAPFLOW_API_KEY" not in json.dumps(record["config"]).replace(
        '"key_name_of_api_key": "CAPFLOW_API_KEY"', "")
    assert again.returncode == 1  # the failed row is kept, still failed
    s = json.loads((tmp_path / "o.jsonl.run.json").read_text())["summary"]
    assert s["skipped"] == 12 and s["requests"] == 0 and s["done"] == 0


def test_hydras_folder_is_out_of_the_way_and_keeps_the_summary(tmp_path):
    data, _ = make_dataset(tmp_path, 3)
    with FakeOpenAIServer() as server:
        result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                             f"api_url={server.base_url}", "model_name=m", cwd=tmp_path)
    assert result.returncode == 0
    assert not (tmp_path / "outputs").exists()
    [run] = (tmp_path / ".capflow" / "runs").iterdir()
    log = (run / "cli.log").read_text()
    assert "capflow finished" in log and "3 done" in log


def test_a_run_that_stops_keeps_its_error_line_in_the_log(tmp_path):
    data, _ = make_dataset(tmp_path, 3)
    with FakeOpenAIServer(api_key="right") as server:
        result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                             f"api_url={server.base_url}", "model_name=m", cwd=tmp_path)
    assert result.returncode == 1
    [run] = (tmp_path / ".capflow" / "runs").iterdir()
    assert "stopped early" in (run / "cli.log").read_text()


def test_a_mistake_caught_before_anything_ran_leaves_nothing_behind(tmp_path):
    result = run_capflow(f"input={tmp_path / 'missing.json'}",
                         f"output={tmp_path / 'sub' / 'o.jsonl'}",
                         "api_url=http://127.0.0.1:9/v1", "model_name=m", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_dry_run_shows_the_first_rows_request_every_time(tmp_path):
    rows = [{"image": [f"./images/{i:05d}.png"], "question": f"Question number {i}?"}
            for i in range(40)]
    make_dataset(tmp_path, 40)  # the images
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shown = set()
    for _ in range(3):
        result = run_capflow(f"input={tmp_path / 'q.jsonl'}", "dry_run=true",
                             "pipeline.steps.caption.input_prompt_key=question",
                             "pipeline.steps.caption.input_conversation_key=null", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        block = result.stdout.split("first row's request:")[1]
        shown.add(block)
        assert "Question number 0?" in block
    assert len(shown) == 1


def test_the_newcomers_dry_run_leaves_the_working_folder_as_it_was(tmp_path):
    result = run_capflow(cwd=tmp_path)  # the README's first command: the bundled sample, dry
    assert result.returncode == 0 and "Nothing was sent" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no caches, journals, run folders or outputs
