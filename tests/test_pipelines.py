"""Multi-step pipelines from config: each step reads what earlier steps wrote, every step's rows
are a file of their own, and a rerun resumes at the step and row where the last run stopped."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CAPFLOW, expected_caption, make_dataset, make_image, read_rows, run_capflow

from capflow.operators import RowFilter
from capflow.testing.server import FakeOpenAIServer


def _args(server: FakeOpenAIServer, data: Path, cache: Path, *extra: str) -> list[str]:
    return [f"input={data}", f"storage.cache_path={cache}", f"api_url={server.base_url}",
            "model_name=m", "progress=false", *extra]


def _step(cache: Path, n: int) -> list[dict]:
    return read_rows(cache / f"caption_step{n}.jsonl")


def test_caption_refine_quotes_step_one_and_writes_both_step_files(tmp_path, server):
    data, _ = make_dataset(tmp_path, 50)
    cache = tmp_path / "steps"
    result = run_capflow(*_args(server, data, cache, "pipeline=caption_refine"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = _step(cache, 1), _step(cache, 2)
    assert len(first) == len(second) == 50
    texts = {}
    for request in server.requests:
        if not request.images:  # step 2: text only
            (role, text), = request.texts
            texts[text] = request
    for i, row in enumerate(second):
        caption = expected_caption(tmp_path / "images" / f"{i:05d}.png")
        assert row["caption"] == caption == first[i]["caption"]
        assert row["refined_caption"] == "no image"  # what the test server says to text
        # Step 2 asked about this row's caption, quoted verbatim.
        assert sum(f'"{caption}"' in text for text in texts) == 1
    assert len(server.requests) == 100


def test_a_kill_during_step_two_resumes_there_and_step_one_is_not_repeated(tmp_path):
    data, _ = make_dataset(tmp_path, 60)
    cache = tmp_path / "steps"
    with FakeOpenAIServer(latency=0.05) as server:
        args = _args(server, data, cache, "pipeline=caption_refine", "max_workers=4")
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        proc = subprocess.Popen([CAPFLOW, *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while sum(not r.images for r in server.requests) < 20:  # well into step 2
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)  # the requests the kill cut off are logged (499) before the reset
        assert (cache / "caption_step1.jsonl").exists()
        assert not (cache / "caption_step2.jsonl").exists()
        with sqlite3.connect(cache / "caption_step2.jsonl.journal.sqlite") as db:
            (journaled,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
        assert journaled >= 10
        server.reset()
        again = run_capflow(*args, "cache.enabled=false", cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert all(not r.images for r in server.requests)  # step 1: nothing asked again
        # Step 2 resumed at the row where it stopped: only the rows not journaled were asked.
        assert len(server.requests) == 60 - journaled
    assert "60 skipped (already done)" in again.stdout
    assert f"{journaled} skipped (already done)" in again.stdout
    rows = _step(cache, 2)
    assert len(rows) == 60 and all(r["refined_caption"] == "no image" for r in rows)


def test_caption_verify_writes_a_structured_verdict_about_the_image(tmp_path, server):
    data, _ = make_dataset(tmp_path, 3)
    cache = tmp_path / "steps"
    result = run_capflow(*_args(server, data, cache, "pipeline=caption_verify"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in _step(cache, 2):
        verdict = row["verdict"]
        assert set(verdict) == {"accurate", "problems", "corrected_caption"}
        assert isinstance(verdict["accurate"], bool) and isinstance(verdict["problems"], list)
    verify = [r for r in server.requests if r.params.get("response_format")]
    assert len(verify) == 3
    for request in verify:  # the image, and the caption quoted
        assert len(request.images) == 1 and f'"{request.images[0]}"' in request.texts[0][1]


def test_rows_failed_in_step_one_stay_failed_with_their_error(tmp_path, server):
    data, rows = make_dataset(tmp_path, 4)
    rows[1]["image"] = ["./images/missing.png"]
    data.write_text(json.dumps(rows))
    cache = tmp_path / "steps"
    result = run_capflow(*_args(server, data, cache, "pipeline=caption_refine"), cwd=tmp_path)
    assert result.returncode == 1
    second = _step(cache, 2)
    assert second[1]["_error"]["type"] == "ImageNotFound"
    assert "refined_caption" not in second[1]
    assert all("refined_caption" in r for n, r in enumerate(second) if n != 1)
    assert len(server.requests) == 3 + 3


def test_caption_filter_drops_rows_by_rule_into_a_file_of_their_own(tmp_path, server):
    data, rows = make_dataset(tmp_path, 6)
    for i in (2, 4):  # these images are 20x20: their captions start "20x20"
        make_image(tmp_path / "images" / f"{i:05d}.png", i, size=(20, 20))
    rows[5]["image"] = ["./images/missing.png"]
    data.write_text(json.dumps(rows))
    cache = tmp_path / "steps"
    out = tmp_path / "kept.jsonl"
    dropped = tmp_path / "dropped.jsonl"
    result = run_capflow(*_args(
        server, data, cache, "pipeline=caption_filter", f"output={out}",
        "pipeline.steps.keep.pattern='^32x24 '", "pipeline.steps.keep.max_length=20",
        f"pipeline.steps.keep.dropped_output={dropped}"), cwd=tmp_path)
    assert result.returncode == 1  # row 5 failed in step 1
    kept = read_rows(out)
    assert [r["id"] for r in kept] == ["0000", "0001", "0003", "0005"]
    assert kept[-1]["_error"]["type"] == "ImageNotFound"  # failed rows pass through
    gone = read_rows(dropped)
    assert [r["id"] for r in gone] == ["0002", "0004"]
    assert all(r["_dropped"]["reason"] == "caption does not match '^32x24 '" for r in gone)
    assert "6 of 6: 3 kept, 2 dropped, 1 failed" in result.stdout
    assert f"dropped   2 rows: {dropped}" in result.stdout


def test_length_bounds_drop_and_the_default_dropped_file(tmp_path, server):
    data, _ = make_dataset(tmp_path, 2)
    cache = tmp_path / "steps"
    result = run_capflow(*_args(server, data, cache, "pipeline=caption_filter",
                                "pipeline.steps.keep.min_length=100"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _step(cache, 2) == []
    gone = read_rows(cache / "caption_step2.jsonl.dropped.jsonl")
    assert [r["_dropped"]["reason"] for r in gone] == [
        "caption has 13 characters, fewer than 100"] * 2  # "32x24 #rrggbb"


def test_filter_rules_on_json_fields():
    keep_true = RowFilter("verdict.accurate", equals=True)
    assert keep_true.why_dropped({"verdict": {"accurate": True}}) is None
    assert keep_true.why_dropped({"verdict": {"accurate": False}}) == \
        "verdict.accurate is false, not true"
    assert keep_true.why_dropped({"caption": "x"}) == "no 'verdict.accurate'"
    lenient = RowFilter("verdict.accurate", equals=True, keep_missing=True)
    assert lenient.why_dropped({"caption": "x"}) is None
    few_tags = RowFilter("caption.tags", min_length=2, max_length=3)
    assert few_tags.why_dropped({"caption": {"tags": ["a"]}}) == \
        "caption.tags has 1 items, fewer than 2"
    assert few_tags.why_dropped({"caption": {"tags": ["a", "b", "c", "d"]}}) == \
        "caption.tags has 4 items, more than 3"
    with pytest.raises(Exception, match="has no rule"):
        RowFilter("caption")
    with pytest.raises(Exception, match="is not a regular expression"):
        RowFilter("caption", pattern="(")


def test_a_sweep_ending_in_a_filter_is_compared_with_every_steps_tokens(tmp_path, server):
    data, _ = make_dataset(tmp_path, 4)
    result = run_capflow("-m", *_args(server, data, Path("steps"), "pipeline=caption_filter",
                                      "prompt=concise,detailed", "output=kept.jsonl",
                                      "pipeline.steps.keep.dropped_output=gone.jsonl",
                                      "hydra.sweep.dir=sw"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = json.loads((tmp_path / "sw" / "comparison.json").read_text())["jobs"]
    assert [job["overrides"] for job in jobs] == [{"prompt": "concise"}, {"prompt": "detailed"}]
    for job in jobs:
        step1 = json.loads((Path(job["output"]).parent / "steps" /
                            "caption_step1.jsonl.run.json").read_text())
        assert job["prompt_tokens"] == step1["output_spent"]["prompt_tokens"] > 0
        assert job["done"] == 4
    for name in ("prompt=concise", "prompt=detailed"):  # each job's own file of dropped rows
        assert (tmp_path / "sw" / name / "gone.jsonl").exists()
    assert not (tmp_path / "gone.jsonl").exists()


def test_a_filter_on_a_structured_field_set_on_the_command_line(tmp_path, server):
    data, _ = make_dataset(tmp_path, 3)
    cache = tmp_path / "steps"
    keep = ("+pipeline.steps.keep={_target_: capflow.operators.RowFilter,"
            " key: verdict.accurate, equals: false, keep_missing: true}")
    result = run_capflow(*_args(server, data, cache, "pipeline=caption_verify", keep),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _step(cache, 3) == []  # the test server finds every caption accurate: true
    gone = read_rows(cache / "caption_step3.jsonl.dropped.jsonl")
    assert [r["_dropped"]["reason"] for r in gone] == ["verdict.accurate is true, not false"] * 3


def test_rows_with_an_error_record_in_the_input_are_asked_again(tmp_path, server):
    data, rows = make_dataset(tmp_path, 2)
    rows[0]["_error"] = {"type": "Timeout", "message": "from an earlier run", "stage": "request"}
    data.write_text(json.dumps(rows))
    out = tmp_path / "o.jsonl"
    result = run_capflow(*_args(server, data, tmp_path / "c", f"output={out}"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.requests) == 2 and all("caption" in r for r in read_rows(out))


def test_what_a_killed_step_spent_is_kept_with_its_rows(tmp_path):
    data, _ = make_dataset(tmp_path, 40)
    out = tmp_path / "o.jsonl"
    with FakeOpenAIServer(latency=0.05) as server:
        args = _args(server, data, tmp_path / "c", f"output={out}", "max_workers=2")
        proc = subprocess.Popen([CAPFLOW, *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(server.requests) < 12:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with sqlite3.connect(tmp_path / "o.jsonl.journal.sqlite") as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM rows").fetchone()
        spent = dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'spent.%'"))
    assert rows >= 8 and float(spent["spent.requests"]) >= rows
    assert float(spent["spent.prompt_tokens"]) > 0 and float(spent["spent.elapsed_s"]) > 0


def test_the_documented_reasking_operator_works(tmp_path, server):
    text = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    code = text.split("```python\nfrom capflow.errors import RowError", 1)[1].split("```")[0]
    namespace: dict = {}
    exec("from capflow.errors import RowError" + code, namespace)  # noqa: S102 - our own docs
    from capflow.serving import OpenAIServing
    from capflow.storage import FileStorage

    data, _ = make_dataset(tmp_path, 2)
    op = namespace["TagGenerator"](
        OpenAIServing(api_url=server.base_url, model_name="m"), system_prompt="Tag it.",
        user_prompt="Tag this image.", input_conversation_key=None)
    storage = FileStorage(str(data), cache_path=str(tmp_path / "c"))
    summary = op.run(storage.step())
    # "32x24 #rrggbb" is one tag: asked once more with the reason, then the row fails.
    assert summary.failed == 2 and summary.retries == 2 and len(server.requests) == 4
    assert "only 1 tags" in server.requests[-1].texts[-1][1]
    assert {r["_error"]["type"] for r in read_rows(tmp_path / "c" / "capflow_step1.jsonl")} == {
        "TooFewTags"}


def test_a_comparison_of_filtered_outputs_lines_up_rows_by_id(tmp_path, server):
    data, _ = make_dataset(tmp_path, 8)
    for i in range(0, 8, 2):  # 15-character captions ("100x100 #rrggbb"), the others 13
        make_image(tmp_path / "images" / f"{i:05d}.png", i, size=(100, 100))
    result = run_capflow("-m", *_args(server, data, Path("steps"), "pipeline=caption_filter",
                                      "pipeline.steps.keep.min_length=13,15", "output=k.jsonl",
                                      "hydra.sweep.dir=sw"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "sw" / "comparison.json").read_text())
    assert [job["done"] for job in report["jobs"]] == [8, 4]
    assert report["sample"]
    for sample in report["sample"]:  # each job's answer is the row's with that id
        caption = expected_caption(tmp_path / "images" / f"{int(sample['id']):05d}.png")
        assert {cell["answer"] for cell in sample["answers"].values()} == {caption}
