"""Datasets of small distinct-colour PNGs, cached by size, and checks of a run's output.

Row ``i`` is captioned with image ``i % images``; the fake server answers
``describe_image(bytes sent)``, so the expected caption of each row is known in advance.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from capflow.testing.server import describe_image

QUESTION = "Generate detailed captions based on image content."


@dataclass
class Dataset:
    """A seed-format JSON dataset whose expected captions are known."""

    path: Path
    rows: int
    expected: list[str]  # by image number

    def expected_caption(self, row: int) -> str:
        """What the server answers for row ``row``."""
        return self.expected[row % len(self.expected)]


def colour_of(i: int) -> tuple[int, int, int]:
    """A colour unique to image ``i`` (for up to 65,536 images)."""
    return (i % 256, (i // 256) % 256, 200)


def make_row(i: int, images: int) -> dict:
    """Row ``i``: an id, its image, a question and fields a careless writer would mangle."""
    return {
        "id": f"{i:06d}",
        "image": [f"./images/{i % images:05d}.png"],
        "conversation": [{"from": "human", "value": QUESTION}],
        "score": 1e5,
        "meta": {"source": "bench", "n": i},
    }


def dataset(cache_root: Path, rows: int, images: int | None = None) -> Dataset:
    """The dataset of ``rows`` rows over ``images`` distinct images (default: one per row),
    made once under ``cache_root`` and reused."""
    images = min(images or rows, rows)
    if images > 65536:
        raise ValueError("at most 65,536 distinct images")
    folder = cache_root / f"rows{rows}-images{images}"
    if not (folder / "expected.json").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        expected = []
        for i in range(images):
            path = tmp / "images" / f"{i:05d}.png"
            Image.new("RGB", (32, 24), colour_of(i)).save(path, "PNG")
            expected.append(describe_image(path.read_bytes()))
        with open(tmp / "data.json", "w") as f:
            f.write("[\n")
            f.write(",\n".join(json.dumps(make_row(i, images)) for i in range(rows)))
            f.write("\n]\n")
        (tmp / "expected.json").write_text(json.dumps(expected))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    expected = json.loads((folder / "expected.json").read_text())
    return Dataset(folder / "data.json", rows, expected)


@dataclass
class Verdict:
    """How an output file compares with what it should hold."""

    rows: int
    found: int = 0
    correct: int = 0
    wrong: int = 0
    errors: int = 0
    missing: int = 0
    duplicated: int = 0
    mangled: int = 0  # not a row of the dataset, or its fields changed
    in_order: bool = True
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Every row present once, in input order, captioned with its own image's answer."""
        return self.correct == self.rows == self.found and self.in_order and not self.problem

    def __str__(self) -> str:
        text = f"{self.correct}/{self.rows} correct"
        extra = [f"{n} {what}" for n, what in (
            (self.wrong, "wrong caption"), (self.errors, "failed"), (self.missing, "missing"),
            (self.duplicated, "duplicated"), (self.mangled, "mangled")) if n]
        if not self.in_order:
            extra.append("out of order")
        if self.problem:
            extra.append(self.problem)
        return text + (f" ({', '.join(extra)})" if extra else "")


def verify(output: Path, data: Dataset) -> Verdict:
    """Check ``output`` (.jsonl or .json) against ``data``; never raises on a bad file."""
    verdict = Verdict(data.rows)
    try:
        text = output.read_text()
        if output.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (OSError, ValueError) as exc:
        verdict.missing, verdict.problem = data.rows, f"unreadable output: {exc}"
        return verdict
    seen: set[int] = set()
    last = -1
    for row in rows:
        verdict.found += 1
        try:
            index = int(row["id"])
        except (KeyError, TypeError, ValueError):
            verdict.mangled += 1
            continue
        if index in seen:
            verdict.duplicated += 1
            continue
        if not 0 <= index < data.rows or row != {**make_row(index, len(data.expected)),
                                                 **_outputs(row)}:
            verdict.mangled += 1
            continue
        seen.add(index)
        verdict.in_order &= index > last
        last = index
        if "_error" in row:
            verdict.errors += 1
        elif row.get("caption") == data.expected_caption(index):
            verdict.correct += 1
        else:
            verdict.wrong += 1
    verdict.missing = data.rows - len(seen)
    return verdict


def _outputs(row: dict) -> dict:
    """The fields capflow adds to a row."""
    return {k: row[k] for k in ("caption", "_error") if k in row}
