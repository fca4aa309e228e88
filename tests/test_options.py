"""Config options not covered elsewhere, each exercised through the real console script."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import termios

from conftest import CAPFLOW, expected_caption, make_dataset, make_image, read_rows, run_capflow

from capflow.testing.faults import FaultConfig
from capflow.testing.server import FakeOpenAIServer


def test_storage_options_name_the_step_file(server, tmp_path):
    data, rows = make_dataset(tmp_path, 3)
    result = run_capflow(f"input={data}", f"api_url={server.base_url}", "model_name=m",
                         "storage.cache_path=steps", "storage.file_name_prefix=cap",
                         "storage.cache_type=json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "steps" / "cap_step1.json").read_text())
    assert [r["id"] for r in written] == [r["id"] for r in rows]


def test_operator_keys_and_prompt_column(server, tmp_path):
    make_image(tmp_path / "a.png", 3)
    rows = [{"img": "a.png", "question": "What colour is it?"}]
    (tmp_path / "d.jsonl").write_text(json.dumps(rows[0]) + "\n")
    step = "pipeline.steps.caption"
    result = run_capflow(
        f"input={tmp_path / 'd.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
        f"api_url={server.base_url}", "model_name=m", f"{step}.input_image_key=img",
        f"{step}.input_prompt_key=question", f"{step}.output_answer_key=alt",
        f"{step}.image_detail=low", "prompt=alt_text", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    [row] = read_rows(tmp_path / "o.jsonl")
    assert row["alt"] == expected_caption(tmp_path / "a.png")
    assert server.requests[0].texts == [("user", "What colour is it?")]
    assert server.requests[0].system.startswith("You write alt text")


def test_prompt_user_question_is_asked_when_a_row_has_no_conversation(server, tmp_path):
    make_image(tmp_path / "a.png", 3)
    (tmp_path / "d.jsonl").write_text('{"image": "a.png"}\n')
    result = run_capflow(f"input={tmp_path / 'd.jsonl'}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", "prompt=concise",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.requests[0].texts == [("user", "Caption this image.")]


def test_retry_knobs_bound_the_attempts(tmp_path):
    data, _ = make_dataset(tmp_path, 2)
    with FakeOpenAIServer(faults=FaultConfig(rate_503=1.0)) as server:
        result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                             f"api_url={server.base_url}", "model_name=m", "retry.max_attempts=3",
                             "retry.initial_wait=0.01", "retry.max_wait=0.02", cwd=tmp_path)
        assert len(server.requests) == 2 * 3
    assert result.returncode == 1
    assert "4 retries" in result.stdout


def test_timeout_abandons_a_slow_request(tmp_path):
    data, _ = make_dataset(tmp_path, 1)
    with FakeOpenAIServer(latency=3.0) as server:
        result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                             f"api_url={server.base_url}", "model_name=m", "timeout=0.3",
                             "retry.max_attempts=1", cwd=tmp_path)
    assert result.returncode == 1
    assert read_rows(tmp_path / "o.jsonl")[0]["_error"]["type"] == "Timeout"


def _run_on_a_terminal(args: list[str], cwd) -> str:
    """Run capflow with stderr on a pseudo-terminal; returns what it drew there."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.run([CAPFLOW, *args], cwd=cwd, stderr=follower,
                              stdout=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0
        os.set_blocking(leader, False)
        try:
            return os.read(leader, 1 << 16).decode(errors="replace")
        except BlockingIOError:
            return ""
    finally:
        os.close(leader)
        os.close(follower)


def test_progress_bar_on_a_terminal_and_progress_false(server, tmp_path):
    data, _ = make_dataset(tmp_path, 5)
    args = [f"input={data}", f"output={tmp_path / 'o.jsonl'}", f"api_url={server.base_url}",
            "model_name=m"]
    assert "5/5" in _run_on_a_terminal(args, tmp_path)
    assert "5/5" not in _run_on_a_terminal([*args, "progress=false"], tmp_path)


def test_generation_parameters_from_the_command_line(server, tmp_path):
    data, _ = make_dataset(tmp_path, 1)
    result = run_capflow(f"input={data}", f"output={tmp_path / 'o.jsonl'}",
                         f"api_url={server.base_url}", "model_name=m", "serving.temperature=0.3",
                         "serving.max_tokens=64", "serving.top_p=0.5", "serving.seed=11",
                         "serving.extra_body={top_k: 5}", "serving.send_request_stream=true",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.requests[0].params == {
        "temperature": 0.3, "max_tokens": 64, "top_p": 0.5, "seed": 11, "top_k": 5,
        "stream_options": {"include_usage": True},
    }
    assert server.requests[0].stream
