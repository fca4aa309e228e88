"""The prompt library, as data: every shipped prompt and pipeline runs; a prompt's user template
uses the row's fields; a prompt of one's own is a YAML file, no plugin needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import read_rows, run_capflow

from capflow.errors import RowError
from capflow.templates import fields, render

CONF = Path(__file__).resolve().parent.parent / "conf"
SAMPLE = Path(__file__).resolve().parent.parent / "capflow" / "data" / "sample"
PROMPTS = sorted(p.stem for p in (CONF / "prompt").glob("*.yaml"))
PIPELINES = sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))


@pytest.fixture
def sample_row(tmp_path: Path) -> Path:
    """The bundled sample's first row, with its photo."""
    rows = json.loads((SAMPLE / "sample_data.json").read_text())
    image = rows[0]["image"][0]
    (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE / image, tmp_path / image)
    path = tmp_path / "one.json"
    path.write_text(json.dumps(rows[:1]))
    return path


def _args(server, data: Path, *extra: str) -> list[str]:
    return [f"input={data}", f"api_url={server.base_url}", "model_name=m", "progress=false",
            *extra]


def test_the_library_has_the_promised_prompts():
    assert {"seed", "concise", "detailed", "alt_text", "ocr", "tags", "structured"} <= set(
        PROMPTS)
    assert {"caption", "caption_refine", "caption_verify", "caption_filter"} <= set(PIPELINES)


def test_every_shipped_prompt_runs_on_a_sample_row(tmp_path, server, sample_row):
    # One sweep over the whole library: one job per prompt, each in its own folder.
    result = run_capflow("-m", *_args(server, sample_row, f"prompt={','.join(PROMPTS)}",
                                      "output=out.jsonl", "hydra.sweep.dir=sw"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(server.requests) == len(PROMPTS)
    for prompt in PROMPTS:
        spec = yaml.safe_load((CONF / "prompt" / f"{prompt}.yaml").read_text())
        (row,) = read_rows(tmp_path / "sw" / f"prompt={prompt}" / "out.jsonl")
        (request,) = [r for r in server.requests if r.system.startswith(spec["system"])]
        assert len(request.images) == 1, prompt
        if spec.get("schema"):
            jsonschema.validate(row["caption"], spec["schema"])
        else:
            assert row["caption"] == request.images[0], prompt


def test_every_shipped_pipeline_runs_on_a_sample_row(tmp_path, server, sample_row):
    result = run_capflow("-m", *_args(server, sample_row, f"pipeline={','.join(PIPELINES)}",
                                      "storage.cache_path=steps", "hydra.sweep.dir=sw"),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for pipeline in PIPELINES:
        steps = tmp_path / "sw" / f"pipeline={pipeline}" / "steps"
        spec = yaml.safe_load((CONF / "pipeline" / f"{pipeline}.yaml").read_text())
        count = 1 + len(spec.get("steps", {})) if "defaults" in spec else len(spec["steps"])
        for n in range(1, count + 1):
            assert (steps / f"caption_step{n}.jsonl").exists(), (pipeline, n)
        (row,) = read_rows(steps / f"caption_step{count}.jsonl")
        assert "_error" not in row and "caption" in row, pipeline


def test_a_user_template_uses_the_row_fields_and_names_a_missing_one(tmp_path, server):
    (tmp_path / "a.png").write_bytes((SAMPLE / "images" / "chelsea.jpg").read_bytes())
    rows = [{"image": "a.png", "title": "Chelsea", "meta": {"source": "cam/7"}},
            {"image": "a.png", "title": "No source"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    result = run_capflow(*_args(server, tmp_path / "d.jsonl", f"output={out}",
                                "prompt.user='Caption {title}, taken by {meta.source}.'"),
                         cwd=tmp_path)
    assert result.returncode == 1
    (request,) = server.requests
    assert request.texts == [("user", "Caption Chelsea, taken by cam/7.")]
    error = read_rows(out)[1]["_error"]
    assert error == {"type": "MissingField", "stage": "prepare",
                     "message": "row has no 'meta.source', which user_prompt uses as"
                                " {meta.source}"}


def test_templates_leave_other_braces_alone():
    row = {"n": 3, "tags": ["a", "b"], "meta": {"k": None}}
    assert render('{n} of {tags}: {"x": 1} {{n}}', row) == '3 of ["a", "b"]: {"x": 1} {n}'
    assert fields("{a.b} {c} {{d}} {1x}") == ["a.b", "c"]
    with pytest.raises(RowError, match="row has a null 'meta.k'"):
        render("{meta.k}", row)


MY_PROMPT = """\
name: mine
system: You caption photos for a bird guide.
user: What bird is this?
"""


def test_a_prompt_file_of_ones_own_needs_no_plugin(tmp_path, server, sample_row):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "concise.yaml").write_text(MY_PROMPT)  # named like a shipped one
    out = tmp_path / "o.jsonl"
    result = run_capflow(*_args(server, sample_row, "prompt=prompts/concise.yaml",
                                f"output={out}"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.requests[0].system == "You caption photos for a bird guide."
    manifest = json.loads((tmp_path / "o.jsonl.run.json").read_text())
    assert "prompt=prompts/concise.yaml" in manifest["command"]  # as typed
    assert manifest["config"]["prompt"]["name"] == "mine"
    # In a sweep beside shipped prompts, too.
    server.reset()
    sweep = run_capflow("-m", *_args(server, sample_row, "prompt=concise,prompts/concise.yaml",
                                     "output=o.jsonl", "hydra.sweep.dir=sw",
                                     "cache.enabled=false"), cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    systems = sorted(r.system for r in server.requests)
    assert systems[0] == "You caption photos for a bird guide."
    assert systems[1].startswith("You write short image captions.")
    assert {p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()} == {
        "prompt=concise", "prompt=concise_1"}


def test_a_prompt_folder_on_the_search_path(tmp_path, server, sample_row):
    (tmp_path / "mine" / "prompt").mkdir(parents=True)
    (tmp_path / "mine" / "prompt" / "birds.yaml").write_text(MY_PROMPT)
    result = run_capflow(*_args(server, sample_row, f"hydra.searchpath=[file://{tmp_path}/mine]",
                                "prompt=birds", "output=o.jsonl"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert server.requests[0].system == "You caption photos for a bird guide."


def test_a_prompt_file_that_is_not_a_mapping_is_one_line(tmp_path, server, sample_row):
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    result = run_capflow(*_args(server, sample_row, "prompt=bad.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and server.requests == []
    assert result.stderr.strip() == ("capflow: error: prompt=bad.yaml must hold a mapping of"
                                     " keys (like conf/prompt/*.yaml), not list")
