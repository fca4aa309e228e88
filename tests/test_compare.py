"""Sweeps that compare: a sweep writes comparison.json, .md, .html and .png of its jobs, and
``capflow compare`` writes the same over any outputs. Real server, real console script; every
figure is recomputed here from the output files and manifests."""

from __future__ import annotations

import html
import json
import re
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import make_dataset, make_image, read_rows, run_capflow
from PIL import Image

from capflow.testing.server import FakeOpenAIServer

PROMPTS = ("concise", "detailed", "alt_text")
FILES = ("comparison.json", "comparison.md", "comparison.html", "comparison.png")
SPENT = ("prompt_tokens", "completion_tokens", "cost", "elapsed_s")
FIGURES = ("overrides", "output", "rows", "done", "failed", "mean_caption_chars",
           "median_caption_chars", *SPENT)
_NUMBER = {"type": "number", "minimum": 0}
SCHEMA = {  # what comparison.json promises
    "type": "object", "required": ["jobs"],
    "properties": {"jobs": {"type": "array", "items": {
        "type": "object", "required": list(FIGURES),
        "properties": {
            "overrides": {"type": "object", "additionalProperties": {"type": "string"}},
            "output": {"type": "string"},
            **{name: {"type": "integer", "minimum": 0} for name in
               ("rows", "done", "failed", "prompt_tokens", "completion_tokens")},
            **{name: _NUMBER for name in
               ("mean_caption_chars", "median_caption_chars", "cost", "elapsed_s")},
        }}}},
}


def sweep(root: Path, data: Path, url: str, values: str = f"prompt={','.join(PROMPTS)}",
          *extra: str, folder: str = "SW") -> subprocess.CompletedProcess[str]:
    return run_capflow("-m", values, f"input={data}", "output=out.jsonl",
                       f"hydra.sweep.dir={folder}", f"api_url={url}", "model_name=m",
                       "price.prompt_per_million=1", "price.completion_per_million=2", *extra,
                       cwd=root)


def compare(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_capflow("compare", *map(str, args), cwd=root)


def manifest(output: Path) -> dict[str, Any]:
    return json.loads(output.with_name(output.name + ".run.json").read_text())


def counted_text(answer: object) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("caption"), str):
        return answer["caption"]
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def expected_figures(output: Path) -> dict[str, Any]:
    """A job's figures, from its output file and the manifests of its pipeline's steps."""
    record = manifest(output)
    key = list(record["config"]["pipeline"]["steps"].values())[-1]["output_answer_key"]
    rows = read_rows(output)
    answers = [r[key] for r in rows if "_error" not in r and r.get(key) is not None]
    chars = [len(counted_text(a)) for a in answers]
    spent = dict.fromkeys(SPENT, 0.0)
    for step_output in record["step"]["outputs"]:
        for name in SPENT:
            spent[name] += manifest(Path(step_output))["output_spent"][name]
    return {
        "overrides": record["sweep"]["overrides"] if record["sweep"] else None,
        "output": str(output.resolve()), "rows": len(rows), "done": len(answers),
        "failed": sum("_error" in r for r in rows),
        "mean_caption_chars": round(statistics.mean(chars), 1) if chars else 0,
        "median_caption_chars": round(statistics.median(chars), 1) if chars else 0,
        **spent,
    }


def check_figures(job: dict[str, Any], output: Path) -> None:
    expected = expected_figures(output)
    for name in FIGURES:
        if name in ("cost", "elapsed_s"):
            assert job[name] == pytest.approx(expected[name], abs=1e-3), name
        elif name != "overrides" or expected[name] is not None:
            assert job[name] == expected[name], name


def sample_row_html(page: str, index: int) -> str:
    found = re.search(rf'<tr id="row-{index}">(.*?)</tr>', page, re.S)
    assert found, f"no sample row {index} on the page"
    return found[1]


def answer_cells(row_html: str) -> list[str]:
    """The cells after the image cell, one per job, in order."""
    return re.findall(r"<td(?: class=\"\w+\")?>(.*?)</td>", row_html, re.S)[1:]


@dataclass
class Swept:
    root: Path
    data: Path
    server: FakeOpenAIServer
    result: subprocess.CompletedProcess[str]
    sent: int
    files: dict[str, bytes]  # the comparison files as the first sweep wrote them


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:
    """A 3-prompt sweep over 50 rows, with the comparison it wrote."""
    root = tmp_path_factory.mktemp("sweep")
    data, _ = make_dataset(root, 50)
    for i in range(50):  # widths of 1 to 3 digits: captions of several lengths
        make_image(root / "images" / f"{i:05d}.png", i, size=(3 + 7 * i, 5))
    with FakeOpenAIServer() as server:
        result = sweep(root, data, server.base_url)
        files = {name: (root / "SW" / name).read_bytes() for name in FILES
                 if (root / "SW" / name).is_file()}
        yield Swept(root, data, server, result, server.stats()["requests_total"], files)


def test_a_sweep_writes_its_comparison(swept: Swept) -> None:
    folder = swept.root / "SW"
    assert swept.result.returncode == 0, swept.result.stderr
    assert sorted(swept.files) == sorted(FILES)
    assert (f"comparison of 3 jobs: {folder.resolve()}/comparison.html (and .json, .md, .png)"
            in swept.result.stdout.splitlines())
    assert swept.sent == 150
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(
        f"prompt={p}" for p in PROMPTS)
    comparison = json.loads(swept.files["comparison.json"])
    jsonschema.validate(comparison, SCHEMA)
    jobs = comparison["jobs"]
    assert [job["overrides"] for job in jobs] == [{"prompt": p} for p in PROMPTS]
    assert [job["label"] for job in jobs] == [f"prompt={p}" for p in PROMPTS]
    outputs = [folder / f"prompt={p}" / "out.jsonl" for p in PROMPTS]
    for job, output in zip(jobs, outputs, strict=True):
        check_figures(job, output)
        assert job["rows"] == job["done"] == 50 and job["failed"] == 0
        assert job["prompt_tokens"] > 0 and job["cost"] > 0
        assert job["mean_caption_chars"] != job["median_caption_chars"]
    assert len({job["prompt_tokens"] for job in jobs}) == 3  # each prompt has its own length

    table = swept.files["comparison.md"].decode()
    for job in jobs:
        assert re.search(rf"^\| {re.escape(job['label'])} \| 50 \| 50 \| 0 \| ", table, re.M)

    with Image.open(folder / "comparison.png") as png:
        assert png.format == "PNG" and png.width > 400
        png.verify()

    page = swept.files["comparison.html"].decode()
    for job in jobs:
        assert f"<th>{html.escape(job['label'])}</th>" in page
    samples = comparison["sample"]
    indices = [s["index"] for s in samples]
    assert len(indices) == 24 == len(set(indices)) and all(0 <= i < 50 for i in indices)
    rows = [read_rows(output) for output in outputs]
    for s in samples:
        row_html = sample_row_html(page, s["index"])
        assert row_html.count("<img") == 1 and "data:image/jpeg;base64," in row_html
        cells = answer_cells(row_html)
        assert len(cells) == 3
        for job, cell, job_rows in zip(jobs, cells, rows, strict=True):
            caption = job_rows[s["index"]]["caption"]
            assert html.escape(caption) in cell
            assert s["answers"][job["label"]] == {"answer": caption, "error": None}
        assert s["image"] == rows[0][s["index"]]["image"]


def test_a_repeated_sweep_sends_nothing_and_compare_agrees(swept: Swept) -> None:
    first = json.loads(swept.files["comparison.json"])
    again = sweep(swept.root, swept.data, swept.server.base_url)
    assert again.returncode == 0, again.stderr
    assert swept.server.stats()["requests_total"] == swept.sent  # every row was done
    rewritten = json.loads((swept.root / "SW" / "comparison.json").read_text())
    for before, after in zip(first["jobs"], rewritten["jobs"], strict=True):
        # The rerun adds its seconds only: no token, no cost.
        assert {k: v for k, v in after.items() if k != "elapsed_s"} == {
            k: v for k, v in before.items() if k != "elapsed_s"}
        check_figures(after, Path(after["output"]))
    assert rewritten["sample"] == first["sample"]

    outputs = [swept.root / "SW" / f"prompt={p}" / "out.jsonl" for p in PROMPTS]
    result = compare(swept.root, *outputs, "--out", "D2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "comparison of 3 jobs: D2/comparison.html (and .json, .md, .png)\n"
    assert sorted(p.name for p in (swept.root / "D2").iterdir()) == sorted(FILES)
    by_command = json.loads((swept.root / "D2" / "comparison.json").read_text())
    assert by_command == rewritten


def test_failed_rows_are_counted_and_shown(tmp_path: Path, server: FakeOpenAIServer) -> None:
    data, _ = make_dataset(tmp_path, 8)
    missing = (3, 5)
    for i in missing:
        (tmp_path / "images" / f"{i:05d}.png").unlink()
    # Two image sizes: the server describes what it receives, so each job answers otherwise.
    result = sweep(tmp_path, data, server.base_url, "image.max_side=16,32",
                   "hydra.callbacks.compare.sample=4")
    assert result.returncode == 1  # rows failed; the comparison is written all the same
    assert "comparison of 2 jobs:" in result.stdout
    folder = tmp_path / "SW"
    comparison = json.loads((folder / "comparison.json").read_text())
    jobs = comparison["jobs"]
    assert [job["label"] for job in jobs] == ["image.max_side=16", "image.max_side=32"]
    outputs = [folder / job["label"] / "out.jsonl" for job in jobs]
    for job, output in zip(jobs, outputs, strict=True):
        check_figures(job, output)
        assert (job["rows"], job["done"], job["failed"]) == (8, 6, 2)
    table = (folder / "comparison.md").read_text()
    assert "| image.max_side=16 | 8 | 6 | 2 |" in table

    page = (folder / "comparison.html").read_text()
    assert [s["index"] for s in comparison["sample"]] == [1, 3, 5, 7]
    rows = [read_rows(output) for output in outputs]
    assert rows[0][1]["caption"] != rows[1][1]["caption"]
    for s in comparison["sample"]:
        cells = answer_cells(sample_row_html(page, s["index"]))
        for job, cell, job_rows in zip(jobs, cells, rows, strict=True):
            row = job_rows[s["index"]]
            if s["index"] in missing:
                error = row["_error"]
                assert error["type"] == "ImageNotFound"
                assert f"<strong>ImageNotFound</strong> {html.escape(error['message'])}" in cell
                assert s["answers"][job["label"]]["error"]["type"] == "ImageNotFound"
            else:
                assert html.escape(row["caption"]) in cell
        if s["index"] in missing:  # the image the row names, not found
            assert "<img" not in sample_row_html(page, s["index"])


def test_compare_mistakes_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "o.jsonl").write_text('{"caption": "a"}\n')
    (tmp_path / "bad.jsonl").write_bytes(b"\xff\xfe\x00")
    for args, says in (
        (["missing.jsonl", "--out", "D"], "no such file: missing.jsonl"),
        (["bad.jsonl", "--out", "D"], "not UTF-8"),
        (["--out", "D"], "at least one output"),
        (["o.jsonl", "--out", "a_file"], "is a file"),
        (["o.jsonl"], "--out"),
    ):
        result = compare(tmp_path, *args)
        assert result.returncode == 2, args
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("capflow compare: error: "), lines
        assert says in lines[0]
    assert not (tmp_path / "D").exists()
    usage = compare(tmp_path, "--help")
    assert usage.returncode == 0 and "--out DIR" in usage.stdout and "--sample N" in usage.stdout
    overall = run_capflow("--help", cwd=tmp_path)
    assert "capflow compare OUTPUTS --out DIR" in overall.stdout


def test_separate_runs_are_labelled_by_what_differs(tmp_path: Path,
                                                    server: FakeOpenAIServer) -> None:
    data, _ = make_dataset(tmp_path, 6)
    outputs = [tmp_path / "runs" / name / "o.jsonl" for name in ("a", "b")]
    for prompt, output in zip(("concise", "detailed"), outputs, strict=True):
        run = run_capflow(f"input={data}", f"output={output}", f"prompt={prompt}",
                          f"api_url={server.base_url}", "model_name=m", cwd=tmp_path)
        assert run.returncode == 0, run.stderr
    result = compare(tmp_path, *outputs, "--out", "D", "--sample", "2")
    assert result.returncode == 0, result.stderr
    comparison = json.loads((tmp_path / "D" / "comparison.json").read_text())
    jobs = comparison["jobs"]
    assert [job["overrides"] for job in jobs] == [{"prompt.name": "concise"},
                                                  {"prompt.name": "detailed"}]
    assert [job["label"] for job in jobs] == ["prompt.name=concise", "prompt.name=detailed"]
    for job, output in zip(jobs, outputs, strict=True):
        check_figures(job, output)
    assert len(comparison["sample"]) == 2
    page = (tmp_path / "D" / "comparison.html").read_text()
    assert "<th>prompt.name=concise</th>" in page and page.count("<img") == 2


def test_a_dry_sweep_writes_nothing_and_a_failed_report_fails_nothing(tmp_path: Path,
                                                                      server: FakeOpenAIServer
                                                                      ) -> None:
    data, _ = make_dataset(tmp_path, 2)
    dry = run_capflow("-m", "prompt=concise,detailed", f"input={data}", "output=out.jsonl",
                      "hydra.sweep.dir=SW", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "comparison" not in dry.stdout + dry.stderr
    assert not any((tmp_path / "SW" / name).exists() for name in FILES)

    (tmp_path / "SW2" / "comparison.json").mkdir(parents=True)  # where a file must go
    result = sweep(tmp_path, data, server.base_url, "prompt=concise,detailed", folder="SW2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "SW2" / "prompt=concise" / "out.jsonl").is_file()
    problems = [line for line in result.stderr.splitlines() if "comparison" in line]
    assert len(problems) == 1
    assert problems[0].startswith("capflow: could not write the comparison: ")
    assert "comparison of" not in result.stdout


def test_outputs_without_manifests_and_structured_answers(tmp_path: Path) -> None:
    rows = [{"image": "x.png", "caption": {"caption": "abc", "tags": ["a"]}},
            {"image": "y.png", "caption": {"objects": 2}},
            {"image": "z.png", "caption": "hello <b>"},
            {"image": "w.png", "_error": {"type": "Refused", "message": "no & never"}}]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = compare(tmp_path, "one/o.jsonl", "two/o.jsonl", "--out", "D")
    assert result.returncode == 0, result.stderr
    jobs = json.loads((tmp_path / "D" / "comparison.json").read_text())["jobs"]
    assert [job["label"] for job in jobs] == ["one/o.jsonl", "two/o.jsonl"]
    lengths = [3, len('{"objects":2}'), len("hello <b>")]
    for job in jobs:
        assert job["overrides"] == {}
        assert (job["rows"], job["done"], job["failed"]) == (4, 3, 1)
        assert job["mean_caption_chars"] == round(statistics.mean(lengths), 1)
        assert job["median_caption_chars"] == statistics.median(lengths)
        assert [job[name] for name in SPENT] == [0, 0, 0, 0]
        assert any("no run manifest" in note for note in job["notes"])
    page = (tmp_path / "D" / "comparison.html").read_text()
    assert "hello &lt;b&gt;" in page and "<b>" not in page
    assert "<strong>Refused</strong> no &amp; never" in page


def test_a_pipeline_counts_what_every_step_spent(tmp_path: Path,
                                                 server: FakeOpenAIServer) -> None:
    data, _ = make_dataset(tmp_path, 4)
    result = sweep(tmp_path, data, server.base_url, "prompt=concise,detailed",
                   "pipeline=caption_refine")
    assert result.returncode == 0, result.stderr
    jobs = json.loads((tmp_path / "SW" / "comparison.json").read_text())["jobs"]
    assert [job["label"] for job in jobs] == ["prompt=concise", "prompt=detailed"]
    for job in jobs:
        output = Path(job["output"])
        assert job["answer_key"] == "refined_caption"
        assert len(manifest(output)["step"]["outputs"]) == 2
        check_figures(job, output)  # summed over both steps' manifests
        # Step 1 asks each prompt anew; step 2 may be answered by the cache (same captions).
        assert job["prompt_tokens"] > manifest(output)["output_spent"]["prompt_tokens"]
