"""The storage contract for plugin authors: a ``StreamingStorage`` subclass implementing only
``read_rows`` and ``write_rows`` gets steps, resume and atomic outputs; ``write()`` is given
rows as dicts; a storage's ``image_key`` tells the pipelines where its images are."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import expected_caption, make_image

from capflow import (
    EngineSettings,
    OpenAIServing,
    PromptedVQAGenerator,
    RowError,
    StreamingStorage,
)


class LinesStorage(StreamingStorage):
    """One image path per line in; the last step's rows out as JSON Lines, sorted keys."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.written: list[list[dict[str, Any]]] = []

    def read_rows(self) -> Iterator[dict[str, Any] | Exception]:
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if line.startswith("!"):
                    yield RowError("Unreadable", f"line {n + 1} is marked unreadable")
                elif line.strip():
                    yield {"picture": line.strip(), "line": n + 1}

    def write_rows(self, rows, path: Path) -> None:  # noqa: ANN001
        first, second = list(rows), list(rows)  # the contract: readable more than once
        assert first == second
        self.written.append(first)
        with open(path, "w", encoding="utf-8") as f:
            for row in first:
                f.write(json.dumps(row, sort_keys=True) + "\n")


def dataset(tmp_path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        make_image(tmp_path / f"{i}.png", i)
        lines.append(f"{i}.png")
    lines.insert(2, "!broken")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return tmp_path / "list.txt"


def caption_op(server, key: str = "caption") -> PromptedVQAGenerator:  # noqa: ANN001
    serving = OpenAIServing(api_url=server.base_url, model_name="m")
    return PromptedVQAGenerator(serving, user_prompt="Describe.", input_image_key="picture",
                                output_answer_key=key)


def settings(tmp_path: Path) -> EngineSettings:
    return EngineSettings(cache_path=None, progress=False, report=False)


def test_a_streaming_storage_gets_steps_resume_and_dict_rows(server, tmp_path):
    src = dataset(tmp_path, 5)
    storage = LinesStorage(str(src), cache_path=str(tmp_path / "cache"), image_key="picture")
    out = tmp_path / "out.jsonl"
    first = caption_op(server).run(storage.step(), settings=settings(tmp_path))
    second = caption_op(server, "again").run(storage.step(output=str(out)),
                                             settings=settings(tmp_path))
    assert (first.done, first.failed) == (5, 1) and (second.done, second.failed) == (5, 1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("line") for r in rows] == [1, 2, None, 4, 5, 6]
    for row in rows:
        if "_error" in row:  # the row read_rows could not read keeps its error's type
            assert row["_error"]["type"] == "Unreadable" and "line 3" in row["_error"]["message"]
            continue
        caption = expected_caption(tmp_path / row["picture"])
        assert row["caption"] == caption and row["again"] == caption
    assert len(storage.written) == 1  # write_rows: the last step only; step 1 a step file
    # The in-between step file is JSON Lines under cache_path; the journal sits by the output.
    assert (tmp_path / "cache" / "capflow_step1.jsonl").is_file()
    assert (tmp_path / "out.jsonl.journal.sqlite").exists()
    sent = len(server.requests)
    rerun = LinesStorage(str(src), cache_path=str(tmp_path / "cache"), image_key="picture")
    one = caption_op(server).run(rerun.step(), settings=settings(tmp_path))
    two = caption_op(server, "again").run(rerun.step(output=str(out)),
                                          settings=settings(tmp_path))
    assert (one.skipped, two.skipped) == (5, 5)  # each step resumed from its journal
    assert len(server.requests) == sent


def test_write_is_given_dicts_and_the_output_is_replaced_whole(server, tmp_path):
    src = dataset(tmp_path, 3)
    out = tmp_path / "out.txt"
    out.write_text("old output\n")
    storage = LinesStorage(str(src))
    view = storage.step(output=str(out))
    assert view.output == str(out) and view.output_path == str(out)
    caption_op(server).run(view, settings=settings(tmp_path))
    (written,) = view.written
    assert all(isinstance(row, dict) for row in written) and len(written) == 4
    assert "old output" not in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt")]  # no temp left


def test_a_change_to_the_input_starts_the_journal_afresh(server, tmp_path):
    src = dataset(tmp_path, 2)
    storage = LinesStorage(str(src))
    identity = storage.step().input_identity()
    assert LinesStorage(str(src)).step().input_identity() == identity
    src.write_text(src.read_text() + "0.png\n")
    assert LinesStorage(str(src)).step().input_identity() != identity


def test_a_missing_input_is_a_one_line_error(tmp_path):
    import pytest

    from capflow import ConfigError

    with pytest.raises(ConfigError, match="input not found: .*nothing.txt"):
        LinesStorage(str(tmp_path / "nothing.txt")).step().check()


def test_the_pipelines_read_images_where_the_storage_says(capflow_config):
    assert capflow_config().pipeline.steps.caption.input_image_key == "image"
    cfg = capflow_config("+storage.image_key=picture")
    assert cfg.pipeline.steps.caption.input_image_key == "picture"
    cfg = capflow_config("+storage.image_key=picture", "pipeline=caption_verify")
    assert {s.input_image_key for s in cfg.pipeline.steps.values()} == {"picture"}
    cfg = capflow_config("+storage.image_key=picture",
                         "pipeline.steps.caption.input_image_key=img")
    assert cfg.pipeline.steps.caption.input_image_key == "img"  # the step's own setting wins


def test_read_rows_runs_once_per_step_in_one_thread(server, tmp_path):
    src = dataset(tmp_path, 3)
    threads: set[str] = set()

    class Watched(LinesStorage):
        def read_rows(self):  # noqa: ANN202
            threads.add(threading.current_thread().name)
            yield from super().read_rows()

    caption_op(server).run(Watched(str(src)).step(), settings=settings(tmp_path))
    assert len(threads) == 1
