"""The real ``capflow`` console script against a real loopback server (acceptance 2, 3, 4, 7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import expected_caption, make_dataset, make_image, read_rows, run_capflow


def _common(server, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"input={data}", f"output={out}", f"api_url={server.base_url}", "model_name=m",
        "max_workers=20", *extra,
    ]


def test_200_rows_each_caption_belongs_to_its_row(server, tmp_path):
    data, rows = make_dataset(tmp_path, 200)
    out = tmp_path / "out.jsonl"
    result = run_capflow(*_common(server, data, out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = read_rows(out)
    assert len(written) == 200
    for original, row in zip(rows, written, strict=True):
        assert row["caption"] == expected_caption(tmp_path / original["image"][0])
        assert {k: v for k, v in row.items() if k != "caption"} == original
    # Byte for byte: each input field's JSON text appears unchanged in the output line.
    line = out.read_text().splitlines()[7]
    assert '"id": "0007"' in line and '"score": 100000.0' in line and '"cam/a"' in line
    assert server.stats()["max_in_flight"] <= 20
    assert len(server.requests) == 200
    assert "200 done, 0 failed" in result.stdout


def test_fields_keep_their_exact_text(server, tmp_path):
    make_image(tmp_path / "a.png", 1)
    raw = '{"id": "0012", "image": "a.png", "x": 1e5, "p": "dir/sub\\\\file", "u": "caf\\u00e9"}'
    (tmp_path / "d.jsonl").write_text(raw + "\n")
    out = tmp_path / "o.jsonl"
    result = run_capflow(*_common(server, tmp_path / "d.jsonl", out, "prompt=concise"),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = out.read_text().strip()
    assert line.startswith(raw[:-1] + ', "caption": ')


def test_bad_rows_fail_alone_and_cost_no_request(server, tmp_path):
    data, rows = make_dataset(tmp_path, 200)
    (tmp_path / "images" / "truncated.png").write_bytes(
        (tmp_path / "images" / "00000.png").read_bytes()[:60]
    )
    (tmp_path / "images" / "notes.png").write_text("this is not an image")
    conv = rows[0]["conversation"]
    bad = [
        {"id": "bad-missing", "image": ["./images/nope.png"], "conversation": conv},
        {"id": "bad-truncated", "image": ["./images/truncated.png"], "conversation": conv},
        {"id": "bad-text", "image": ["./images/notes.png"], "conversation": conv},
        {"id": "bad-empty", "image": [], "conversation": conv},
    ]
    mixed = rows[:50] + bad[:2] + rows[50:150] + bad[2:] + rows[150:]
    data.write_text(json.dumps(mixed, indent=2))
    out = tmp_path / "out.json"
    result = run_capflow(*_common(server, data, out), cwd=tmp_path)
    assert result.returncode == 1
    assert "200 done, 4 failed" in result.stdout
    written = read_rows(out)
    assert len(written) == 204
    good = [r for r in written if not r["id"].startswith("bad")]
    assert all(r["caption"] == expected_caption(tmp_path / r["image"][0]) for r in good)
    errors = {r["id"]: r["_error"] for r in written if r["id"].startswith("bad")}
    assert all("caption" not in r for r in written if r["id"].startswith("bad"))
    assert errors["bad-missing"]["type"] == "ImageNotFound"
    assert "nope.png" in errors["bad-missing"]["message"]
    assert errors["bad-truncated"]["type"] == "ImageUnreadable"
    assert errors["bad-text"]["type"] == "ImageUnreadable"
    assert "not an image" in errors["bad-text"]["message"]
    assert errors["bad-empty"]["type"] == "NoImage"
    assert len(server.requests) == 200  # none for the bad rows


def test_sweep_runs_one_job_per_prompt_with_its_own_output(server, tmp_path):
    data, _ = make_dataset(tmp_path, 5)
    result = run_capflow(
        "-m", "prompt=concise,detailed", *_common(server, data, Path("out.jsonl")), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    outputs = sorted(tmp_path.glob("multirun/*/*/*/out.jsonl"))
    assert len(outputs) == 2
    assert all(len(read_rows(p)) == 5 for p in outputs)
    systems = {r.system for r in server.requests}
    assert len(systems) == 2 and len(server.requests) == 10
    for job_dir in (p.parent for p in outputs):
        prompt = (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert "prompt=concise" in prompt or "prompt=detailed" in prompt


def test_hydra_mode_multirun_override_sweeps_without_m(server, tmp_path):
    # capflow skips Hydra's mode probe only when nothing on the command line can set the mode.
    data, _ = make_dataset(tmp_path, 3)
    result = run_capflow("hydra.mode=MULTIRUN", "prompt=concise,detailed",
                         *_common(server, data, Path("out.jsonl")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(sorted(tmp_path.glob("multirun/*/*/*/out.jsonl"))) == 2
    assert len(server.requests) == 6


def test_a_users_primary_config_can_make_a_run_a_sweep(server, tmp_path):
    data, _ = make_dataset(tmp_path, 3)
    conf = tmp_path / "myconf"
    conf.mkdir()
    (conf / "mine.yaml").write_text(
        "defaults:\n  - config\n  - _self_\nhydra:\n  mode: MULTIRUN\n"
        "  sweeper:\n    params:\n      prompt: concise,detailed\n"
    )
    result = run_capflow("-cd", str(conf), "-cn", "mine",
                         *_common(server, data, Path("out.jsonl")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(sorted(tmp_path.glob("multirun/*/*/*/out.jsonl"))) == 2
    assert len({r.system for r in server.requests}) == 2


def test_a_config_group_that_sets_multirun_still_makes_a_sweep(server, tmp_path):
    data, _ = make_dataset(tmp_path, 3)
    (tmp_path / "extra" / "sweep").mkdir(parents=True)
    (tmp_path / "extra" / "sweep" / "two.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n"
        "  sweeper:\n    params:\n      prompt: concise,detailed\n"
    )
    result = run_capflow(f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "+sweep=two",
                         *_common(server, data, Path("out.jsonl")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(sorted(tmp_path.glob("multirun/*/*/*/out.jsonl"))) == 2


@pytest.mark.parametrize("transport", ["http", "aiohttp", "sdk"])
def test_api_key_is_sent_but_never_written(tmp_path, transport):
    from capflow.testing.server import FakeOpenAIServer

    key = "sk-test-" + os.urandom(12).hex()
    data, _ = make_dataset(tmp_path, 3)
    with FakeOpenAIServer(api_key=key) as server:
        result = run_capflow(
            *_common(server, data, tmp_path / "out.jsonl", "key_name_of_api_key=MY_VLM_KEY",
                     f"serving.transport={transport}"),
            "hydra.job_logging.root.level=DEBUG", cwd=tmp_path, env={"MY_VLM_KEY": key},
        )
        assert result.returncode == 0, result.stderr
        assert server.requests[0].headers["Authorization"] == f"Bearer {key}"
    assert key not in result.stdout + result.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written)
    for path in written:
        assert key.encode() not in path.read_bytes(), path


def test_wrong_key_fails_rows_with_the_servers_message(tmp_path):
    from capflow.testing.server import FakeOpenAIServer

    data, _ = make_dataset(tmp_path, 2)
    with FakeOpenAIServer(api_key="right") as server:
        result = run_capflow(*_common(server, data, tmp_path / "o.jsonl"), cwd=tmp_path,
                             env={"CAPFLOW_API_KEY": "wrong"})
        assert len(server.requests) == 2  # 401 is not retried
    assert result.returncode == 1
    rows = read_rows(tmp_path / "o.jsonl")
    assert rows[0]["_error"]["type"] == "AuthenticationError"
    assert "Incorrect API key" in rows[0]["_error"]["message"]


def test_newcomer_command_dry_runs_the_sample_and_says_what_to_set(tmp_path):
    result = run_capflow(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 to send" in result.stdout
    assert "capflow api_url=" in result.stdout.splitlines()[-1]
    assert not list(tmp_path.rglob("*.jsonl"))  # a dry run invents no captions


def test_dry_run_needs_no_key_and_sends_nothing(server, tmp_path):
    data, _ = make_dataset(tmp_path, 4)
    (tmp_path / "images" / "00002.png").unlink()
    result = run_capflow(*_common(server, data, tmp_path / "o.jsonl", "dry_run=true"),
                         cwd=tmp_path)
    assert result.returncode == 1  # a row that would fail is reported
    assert "3 to send" in result.stdout
    assert "ImageNotFound" in result.stdout
    assert len(server.requests) == 0
    assert not (tmp_path / "o.jsonl").exists()


def test_help_lists_groups_and_options(tmp_path):
    result = run_capflow("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "prompt: alt_text, concise, detailed, ocr, seed, structured, tags" in result.stdout
    assert "serving: batch_file, openai, openai_batch" in result.stdout
    assert "storage: file" in result.stdout


def test_cfg_job_shows_interpolated_knobs(tmp_path):
    result = run_capflow("--cfg", "job", "--resolve", "max_workers=7", "model_name=mm",
                         "api_url=http://127.0.0.1:1/v1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "max_workers: 7" in result.stdout and "model_name: mm" in result.stdout


def test_bad_input_file_is_a_one_line_error(tmp_path):
    result = run_capflow(f"input={tmp_path}/missing.json", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"capflow: error: input file not found: {tmp_path}/missing.json"


def test_an_unknown_option_is_a_usage_error(tmp_path):
    result = run_capflow("serving=xyz", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("capflow: error: unknown option serving=xyz (serving options:"
                             " batch_file, openai, openai_batch)\n")


def test_version(tmp_path):
    result = run_capflow("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("capflow 0.")


def test_a_key_typed_as_the_key_name_is_refused_before_anything_is_saved(tmp_path):
    result = run_capflow("key_name_of_api_key=sk-abc123def456", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2
    assert "must be the NAME of an environment variable" in result.stderr
    assert "sk-abc123def456" not in result.stderr
    assert not list(tmp_path.rglob("*.yaml"))


def test_output_of_an_unknown_format_is_refused(tmp_path):
    # The wording is the storage's (tests/test_input_checks.py); here: one line, exit 2.
    result = run_capflow("output=out.txt", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("capflow: error: ") and "out.txt" in line and ".jsonl" in line


def test_start_up_errors_are_one_line_configuration_errors(tmp_path):
    from capflow.testing.server import FakeOpenAIServer

    data, _ = make_dataset(tmp_path, 2)
    with FakeOpenAIServer(models=["a", "b"]) as server:
        several = run_capflow(f"input={data}", f"api_url={server.base_url}", cwd=tmp_path)
    with FakeOpenAIServer(api_key="right") as server:
        refused = run_capflow(f"input={data}", f"api_url={server.base_url}", cwd=tmp_path,
                              env={"CAPFLOW_API_KEY": "wrong"})
    assert several.returncode == refused.returncode == 2
    assert several.stderr.strip() == (
        "capflow: error: model_name is not set and the server offers a, b: set one"
    )
    assert refused.stderr.strip() == (
        "capflow: error: the server refused the API key: Incorrect API key provided"
    )


def test_a_sweep_with_a_fixed_folder_resumes(server, tmp_path):
    data, _ = make_dataset(tmp_path, 4)
    args = ["-m", "prompt=concise,detailed", "hydra.sweep.dir=sweeps/s", "cache.enabled=false",
            *_common(server, data, Path("out.jsonl"))]
    assert run_capflow(*args, cwd=tmp_path).returncode == 0
    again = run_capflow(*args, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("4 skipped (already done)") == 2
    assert len(server.requests) == 8
    assert len(read_rows(tmp_path / "sweeps" / "s" / "prompt=detailed" / "out.jsonl")) == 4
