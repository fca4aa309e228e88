"""More input formats through the real ``capflow`` command against the loopback server: a folder
of images, CSV and TSV files (and CSV/TSV output), and every input mistake (an unknown format,
a CSV without an image column, a JSON syntax error late in a large file) stopped with one line
before anything is sent or created."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from conftest import expected_caption, make_image, read_rows, run_capflow
from PIL import Image

# Hydra's own record of the run goes in the working folder, as in test_input_checks: what a
# failed run must not leave is everything else (outputs, journals, locks, caches, folders).
_HYDRA_HERE = ("hydra.run.dir=.", "hydra.output_subdir=null")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix != ".log")


def _run(tmp_path: Path, server, *args: str):
    return run_capflow(*args, f"api_url={server.base_url}", "model_name=m", *_HYDRA_HERE,
                       cwd=tmp_path, timeout=60)


def _assert_refused(tmp_path: Path, server, args: list[str], message: str) -> None:
    """The command exits 2 with ``message`` as its one line, sends nothing, creates nothing."""
    before = _tree(tmp_path)
    result = _run(tmp_path, server, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"capflow: error: {message}\n"
    assert "Traceback" not in result.stdout
    assert server.stats()["requests_total"] == 0 and server.requests == []
    assert _tree(tmp_path) == before


# --- a folder of images ---------------------------------------------------------------------


def _jpeg(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (i * 7 % 256, 90, 30)).save(path, "JPEG", quality=90)


def _photo_folder(root: Path) -> list[str]:
    """30 images (some in subfolders, some with upper-case extensions or in JPEG), mixed with
    what must not be captioned; returns the images' relative paths."""
    images = []
    for i in range(18):
        name = f"img{i:02d}.png" if i % 5 else f"IMG{i:02d}.PNG"
        make_image(root / name, i)
        images.append(name)
    for i in range(18, 26):
        name = f"trip/day{i}.png"
        make_image(root / name, i)
        images.append(name)
    for i in range(26, 30):
        name = f"trip/raw/shot{i}.jpeg" if i % 2 else f"trip/raw/shot{i}.JPG"
        _jpeg(root / name, i)
        images.append(name)
    # Not images to caption: hidden files and folders, other files, a link out of the folder.
    make_image(root / ".thumbs" / "img00.png", 100)
    make_image(root / "trip" / ".cover.png", 101)
    (root / "notes.txt").write_text("not an image")
    (root / "trip" / "raw" / "shot.xmp").write_text("<x/>")
    make_image(root.parent / "elsewhere.png", 102)
    os.symlink(root.parent / "elsewhere.png", root / "linked_out.png")
    return images


def test_a_folder_of_images_is_captioned_image_by_image(tmp_path, server):
    photos = tmp_path / "photos"
    images = _photo_folder(photos)
    result = _run(tmp_path, server, f"input={photos}/", f"output={tmp_path}/out.jsonl")
    assert result.returncode == 0, result.stderr
    rows = read_rows(tmp_path / "out.jsonl")
    assert [row["id"] for row in rows] == sorted(images)  # sorted by relative path
    for row in rows:
        assert row == {"id": row["id"], "image": [row["id"]],
                       "caption": expected_caption(photos / row["id"])}
    assert server.stats()["requests_total"] == 30


def test_an_empty_folder_is_refused(tmp_path, server):
    (tmp_path / "photos" / ".hidden").mkdir(parents=True)
    make_image(tmp_path / "photos" / ".hidden" / "x.png", 1)
    _assert_refused(tmp_path, server, [f"input={tmp_path}/photos", f"output={tmp_path}/o.jsonl"],
                    f"input folder {tmp_path}/photos has no images (.bmp, .gif, .jpeg, .jpg,"
                    " .png, .tif, .tiff, .webp; hidden files and folders are skipped)")


# --- CSV and TSV ------------------------------------------------------------------------------


def _table(tmp_path: Path, name: str, column: str, delimiter: str) -> list[dict[str, str]]:
    """A table of 6 rows whose images are in ``images/``: cells a careless reader would
    mangle, a byte order mark, an empty image cell and a row with a cell too many."""
    rows = []
    for i in range(4):
        make_image(tmp_path / "images" / f"{i}.png", i)
        rows.append({"id": f"{i:04d}", column: f"images/{i}.png",
                     "note": f"café, \"quoted\"\nline {i}", "score": "1e5"})
    rows.append({"id": "0004", column: "", "note": "no image", "score": ""})
    with open(tmp_path / name, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(list(row.values()))
        writer.writerow(["0005", "images/0.png", "one", "two", "a cell too many"])
    return rows


def _check_table_output(out: Path, rows: list[dict[str, str]], column: str,
                        tmp_path: Path) -> None:
    if out.suffix == ".jsonl":
        got = read_rows(out)
    else:
        with open(out, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if out.suffix == ".tsv" else ",")
            extra = [] if column == "image" else ["image"]
            assert reader.fieldnames == [*rows[0], *extra, "caption", "_raw", "_error"]
            got = [{k: v for k, v in row.items() if v != ""} for row in reader]
    assert len(got) == 6
    for row, want in zip(got[:4], rows[:4], strict=True):
        for key, value in want.items():
            assert row[key] == value  # every original column, as it was
        assert row["caption"] == expected_caption(tmp_path / want[column])
    error = got[4]["_error"]
    error = json.loads(error) if isinstance(error, str) else error
    assert error["type"] == "NoImage" and "caption" not in got[4]
    bad = got[5]["_error"]
    bad = json.loads(bad) if isinstance(bad, str) else bad
    # The header, 4 rows of two lines each (a quoted line break) and one of one: line 11.
    assert bad["type"] == "BadRow" and bad["message"].endswith(
        ":11: 5 cells where the header has 4 columns")


@pytest.mark.parametrize(("name", "column", "option", "output"), [
    ("data.csv", "image", None, "out.csv"),
    ("data.tsv", "photo", "photo", "out.jsonl"),
    ("data.csv", "Filename", None, "out.tsv"),  # found by name, whatever its case
])
def test_csv_and_tsv_inputs_and_outputs(tmp_path, server, name, column, option, output):
    rows = _table(tmp_path, name, column, "\t" if name.endswith(".tsv") else ",")
    args = [f"input={tmp_path / name}", f"output={tmp_path / output}"]
    if option:
        args.append(f"storage.image_column={option}")
    result = _run(tmp_path, server, *args)
    assert result.returncode == 1, result.stderr  # two rows fail, each with its reason
    _check_table_output(tmp_path / output, rows, column, tmp_path)
    assert server.stats()["requests_total"] == 4


def test_a_csv_without_an_image_column_is_refused(tmp_path, server):
    (tmp_path / "data.csv").write_text("id,picture,label\n1,a.png,x\n")
    _assert_refused(tmp_path, server, [f"input={tmp_path}/data.csv",
                                       f"output={tmp_path}/out.csv"],
                    f"{tmp_path}/data.csv has no image column (its columns: id, picture,"
                    " label); set storage.image_column to the column with the image paths or"
                    " URLs")


# --- mistakes found before anything is sent ---------------------------------------------------


def test_a_json_syntax_error_late_in_a_large_array_is_refused(tmp_path, server):
    make_image(tmp_path / "images" / "0.png", 0)
    rows = [{"id": f"{i:05d}", "image": ["./images/0.png"], "taken": "2024-01-02"}
            for i in range(30_000)]
    text = json.dumps(rows, indent=2)
    where = text.index('"id": "29990"')
    text = text[:where] + '"id" "29990"' + text[where + len('"id": "29990"'):]
    (tmp_path / "data.json").write_text(text)
    error = where + len('"id" ')  # where the ':' should be, the decoder says
    line = text.count("\n", 0, error) + 1
    column = error - text.rindex("\n", 0, error)
    near = text[max(text.rindex("{", 0, where), error - 20) : error + 20]
    _assert_refused(tmp_path, server, [f"input={tmp_path}/data.json",
                                       f"output={tmp_path}/out.jsonl"],
                    f"{tmp_path}/data.json:{line}:{column}: row 29991 is not valid JSON"
                    f" (Expecting ':' delimiter) near {near!r}")


_UNKNOWN = [
    ("data.parquet", None, "cannot read input {p}/data.parquet: unknown format .parquet; capflow"
     " reads .json, .jsonl, .csv and .tsv files and folders of images; Parquet comes from a"
     " plugin package (storage=parquet, once installed)"),
    ("data.xlsx", None, "cannot read input {p}/data.xlsx: unknown format .xlsx; capflow reads"
     " .json, .jsonl, .csv and .tsv files and folders of images; save the sheet as .csv"),
    ("data.csv", "out.parquet", "cannot write output {p}/out.parquet: unknown format .parquet;"
     " capflow writes .json, .jsonl, .csv and .tsv files; Parquet comes from a plugin package"
     " (storage=parquet, once installed)"),
    ("data.csv", "out.txt", "cannot write output {p}/out.txt: unknown format .txt; capflow"
     " writes .json, .jsonl, .csv and .tsv files"),
    ("data.jsonl", None, "{p}/data.jsonl:1: the first row is not JSON (Expecting value); the"
     " file looks like comma-separated values: name it .csv"),
]


@pytest.mark.parametrize(("name", "output", "message"), _UNKNOWN,
                         ids=[f"{n}-{o}" for n, o, _ in _UNKNOWN])
def test_formats_capflow_cannot_read_or_write_are_refused(tmp_path, server, name, output,
                                                          message):
    make_image(tmp_path / "a.png", 0)
    # CSV text under every name: a .jsonl that is CSV is found out by its first row.
    (tmp_path / name).write_text("id,image\n1,a.png\n")
    _assert_refused(tmp_path, server, [f"input={tmp_path / name}",
                                       f"output={tmp_path / (output or 'out.jsonl')}"],
                    message.format(p=tmp_path))
