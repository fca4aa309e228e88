"""MapStep: steps that send no request. ``apply`` runs in the preparation pool's threads and
adds fields or drops rows; ``admit`` decides in input order; rows that fail or failed earlier
are kept with their error; dropped rows are listed in a file of their own."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import read_rows, run_capflow, write_rows

from capflow import DropRow, EngineSettings, FileStorage, MapStep, RowError
from capflow.storage.streaming import StreamingStorage

QUIET = EngineSettings(progress=False, report=False)


class WordCount(MapStep):
    """Counts a text's words; drops empty texts, fails non-texts, keeps each count once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        self.seen: set[int] = set()
        self.order: list[int] = []

    def apply(self, row: dict[str, Any]) -> dict[str, Any] | None:
        with self.lock:
            self.threads.add(threading.current_thread().name)
        text = row.get("text")
        if text is None:
            return None
        if not isinstance(text, str):
            raise RowError("NotText", f"text is a {type(text).__name__}")
        if not text.strip():
            raise DropRow("empty text")
        return {"words": len(text.split())}

    def admit(self, row: dict[str, Any]) -> str | None:
        self.order.append(row["n"])
        if row["words"] in self.seen:
            return f"another row has {row['words']} words"
        self.seen.add(row["words"])
        return None


def rows() -> list[dict[str, Any]]:
    texts = ["one", "two words", "a b c", None, "   ", 7, "x y", "p q r s",  # then 5, 6, ... words
             *(" ".join(["w"] * (5 + i)) for i in range(600))]
    out = [{"n": n, "text": t} for n, t in enumerate(texts)]
    out[3].pop("text")
    out.append({"n": len(out), "text": "z", "_error": {"type": "Earlier", "message": "m"}})
    return out


def test_apply_in_the_pool_admit_in_order_drops_listed(tmp_path):
    write_rows(tmp_path / "data.jsonl", rows())
    step = WordCount()
    storage = FileStorage(str(tmp_path / "data.jsonl"), cache_path=str(tmp_path / "cache"))
    out = tmp_path / "out.jsonl"
    summary = step.run(storage.step(output=str(out)), settings=QUIET)
    assert step.threads and all(t.startswith("capflow-prepare") for t in step.threads)
    kept = read_rows(out)
    assert [r["n"] for r in kept] == [0, 1, 2, 5, *range(7, 609)]  # input order kept
    assert [r.get("words") for r in kept[:3]] == [1, 2, 3]
    assert kept[3]["_error"]["type"] == "NotText" and "words" not in kept[3]
    assert kept[-1]["_error"]["type"] == "Earlier" and "words" not in kept[-1]  # untouched
    # admit saw every row apply kept, in input order, once.
    assert step.order == sorted(step.order) and len(step.order) == len(set(step.order))
    dropped = read_rows(tmp_path / "out.jsonl.dropped.jsonl")
    assert {r["n"]: r["_dropped"]["reason"] for r in dropped} == {
        3: "dropped by WordCount", 4: "empty text", 6: "another row has 2 words"}
    assert all(r["_dropped"]["step"] == "WordCount" for r in dropped)
    assert (summary.rows, summary.done, summary.dropped, summary.failed) == (609, 604, 3, 2)


def test_a_dry_run_counts_and_writes_nothing(tmp_path):
    write_rows(tmp_path / "data.jsonl", rows()[:8])
    storage = FileStorage(str(tmp_path / "data.jsonl"))
    summary = WordCount().run(storage.step(output=str(tmp_path / "out.jsonl")), dry_run=True,
                              settings=QUIET)
    assert (summary.done, summary.dropped, summary.failed) == (4, 3, 1)
    assert not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.dropped.jsonl").exists()


class Collecting(StreamingStorage):
    """Rows from a JSON Lines file; the output keeps what write_rows was given."""

    def read_rows(self):  # noqa: ANN201
        with open(self.path, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f)

    def write_rows(self, rows, path: Path) -> None:  # noqa: ANN001
        once, twice = list(rows), list(rows)
        assert once == twice  # mapped rows, too, can be read twice
        path.write_text(json.dumps(once))


def test_a_dict_storage_gets_the_mapped_rows_as_dicts(tmp_path):
    write_rows(tmp_path / "data.jsonl", rows()[:3])
    out = tmp_path / "out.json"
    WordCount().run(Collecting(str(tmp_path / "data.jsonl")).step(output=str(out)),
                    settings=QUIET)
    assert [r["words"] for r in json.loads(out.read_text())] == [1, 2, 3]


def test_a_base_without_apply_says_so(tmp_path):
    write_rows(tmp_path / "data.jsonl", [{"a": 1}])
    summary = MapStep().run(FileStorage(str(tmp_path / "data.jsonl")).step(
        output=str(tmp_path / "o.jsonl")), settings=QUIET)
    assert summary.failed == 1
    assert "must implement apply" in read_rows(tmp_path / "o.jsonl")[0]["_error"]["message"]


@pytest.mark.parametrize("last", [True, False])
def test_filter_only_pipelines_run_without_a_server(tmp_path, last):
    """No step sends a request: no api_url is needed, the output is written for real. A filter
    before the last step lists its dropped rows beside the pipeline's output."""
    write_rows(tmp_path / "data.jsonl", [{"caption": "a long enough caption"},
                                         {"caption": "short"}])
    extra = [] if last else [
        "+pipeline.steps.again._target_=capflow.operators.RowFilter",
        "+pipeline.steps.again.key=caption", "+pipeline.steps.again.min_length=1"]
    result = run_capflow("input=data.jsonl", "output=out.jsonl", "pipeline=caption_filter",
                         "~pipeline.steps.caption", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["caption"] for r in read_rows(tmp_path / "out.jsonl")] == [
        "a long enough caption"]
    dropped = tmp_path / ("out.jsonl.dropped.jsonl" if last else "out.jsonl.keep.dropped.jsonl")
    assert [r["caption"] for r in read_rows(dropped)] == ["short"]
    assert "Nothing was sent" not in result.stdout
