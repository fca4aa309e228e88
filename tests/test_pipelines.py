"""Multi-step pipelines from config: each step reads what earlier steps wrote, every step's rows
are a file of their own, and a rerun resumes at the step and row where the last run stopped."""

from __future__ import annotations

import json
import os
import signal
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
        assert (cache / "caption_step1.jsonl").exists()
        assert not (cache / "caption_step2.jsonl").exists()
        server.reset()
        again = run_capflow(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert all(not r.images for r in server.requests)  # step 1: nothing asked again
        assert len(server.requests) <= 60 - 20 + 4  # step 2: only what the kill left
    assert "60 skipped (already done)" in again.stdout
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
    assert "6 of 6: 3 kept, 2 dropped, 1 failed in an earlier step" in result.stdout
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
