"""``capflow show``: counts, failures and sample captions of a real run's output, and the
gallery page, checked by parsing it and in a real headless browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import tracemalloc
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import CAPFLOW, make_dataset, read_rows, run_capflow
from PIL import Image

from capflow.testing.server import FakeOpenAIServer

# Until cli.py dispatches `capflow show` to capflow.show.main, the module is run directly;
# test_console_script_dispatches_show runs the real console script once it does.
SHOW = [CAPFLOW, "show"]
ROWS = 12
MISSING = (3, 8)  # rows whose image file is deleted before the run
NOT_AN_IMAGE = 5  # a row whose "image" is a text file
BIG = 10  # a row whose image is an 800x600 JPEG turned upright by EXIF (orientation 6)


def show(*args: str | Path, cwd: Path, command: list[str] = SHOW) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict]]]:
    """A real capflow run over 12 rows, 3 of which fail at prepare: (output, its rows)."""
    root = tmp_path_factory.mktemp("run")
    data, _ = make_dataset(root / "data", ROWS)
    for i in MISSING:
        (root / "data" / "images" / f"{i:05d}.png").unlink()
    (root / "data" / "images" / f"{NOT_AN_IMAGE:05d}.png").write_text("not an image")
    big = Image.new("RGB", (800, 600), (200, 40, 40))
    exif = big.getexif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    big.save(root / "data" / "images" / f"{BIG:05d}.png", "JPEG", exif=exif.tobytes())
    out = root / "out" / "out.jsonl"
    out.parent.mkdir()
    with FakeOpenAIServer() as server:
        result = run_capflow(f"input={data}", f"output={out}", f"api_url={server.base_url}",
                             cwd=root)
    assert result.returncode == 1, result.stderr  # rows failed
    yield out, read_rows(out)


def _captioned(rows: list[dict]) -> list[int]:
    return [i for i, row in enumerate(rows) if "caption" in row]


# -- the text report -------------------------------------------------------------------------


def test_counts_failures_and_samples(run):
    out, rows = run
    result = show(out, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert f"{out}: 12 rows, 9 captioned, 3 failed" in text
    not_found = [line for line in text.splitlines() if "ImageNotFound" in line]
    assert len(not_found) == 1  # grouped: one line per error type
    assert " 2   e.g. row 3: image file not found:" in not_found[0]
    assert f"{MISSING[0]:05d}.png" in not_found[0]
    unreadable = next(line for line in text.splitlines() if "ImageUnreadable" in line)
    assert f" 1   e.g. row {NOT_AN_IMAGE}: " in unreadable
    samples = text.split("samples (5 of 9 captioned rows)\n", 1)[1].splitlines()
    assert len(samples) == 5
    captioned = _captioned(rows)
    shown = []
    for line in samples:
        index = int(line.split()[1])
        row = rows[index]
        assert line == (f"  row {index} (id {row['id']}) {row['image'][0]}: {row['caption']}")
        shown.append(captioned.index(index))
    assert shown == [0, 2, 4, 6, 8]  # spread evenly over the captioned rows


def test_samples_and_key_options(run):
    out, rows = run
    two = show(out, "--samples", "2", cwd=out.parent)
    assert two.returncode == 0
    assert "samples (2 of 9 captioned rows)" in two.stdout
    assert len(two.stdout.split("samples (2 of 9")[1].splitlines()) == 3
    none = show(out, "--samples", "0", cwd=out.parent)
    assert none.returncode == 0 and "samples" not in none.stdout
    other_key = show(out, "--key", "answer", cwd=out.parent)
    assert other_key.returncode == 0
    assert "12 rows, 0 captioned, 3 failed" in other_key.stdout
    assert "9 rows with neither 'answer' nor an error record" in other_key.stdout


def test_json_array_csv_and_tsv_outputs_read_the_same(run, tmp_path):
    out, rows = run
    as_json = tmp_path / "out.json"
    as_json.write_text(json.dumps(rows, indent=1))
    # As capflow writes CSV and TSV: strings as they are, other values as compact JSON, a key
    # a row lacks as an empty cell.
    tables = [tmp_path / "out.csv", tmp_path / "out.tsv"]
    for table in tables:
        with open(table, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, dialect="excel-tab" if table.suffix == ".tsv" else "excel")
            writer.writerow(["id", "image", "caption", "_error"])
            for row in rows:
                writer.writerow([row["id"], json.dumps(row["image"], separators=(",", ":")),
                                 row.get("caption", ""),
                                 json.dumps(row["_error"]) if "_error" in row else ""])
    # The same failures and samples (the run manifest lies beside the original only).
    expected = show(out, cwd=out.parent).stdout.split("failed by error type")[1]
    for path in (as_json, *tables):
        result = show(path, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{path}: 12 rows, 9 captioned, 3 failed\n")
        assert result.stdout.split("failed by error type")[1] == expected


def test_the_run_manifest_is_summed_up_and_a_bad_one_passed_over(run, tmp_path):
    out, _ = run
    manifest = json.loads(out.with_name(out.name + ".run.json").read_text())
    summary = manifest["summary"]
    result = show(out, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = lines.index(f"run (out.jsonl.run.json): finished {manifest['ended']}")
    figures = " ".join(line.strip() for line in lines[at + 1 : at + 3])
    assert "requests 9, retries 0, cache hits 0," in figures
    assert (f"tokens {summary['prompt_tokens']:,} prompt + {summary['completion_tokens']:,}"
            " completion, cost 0.0000, elapsed ") in figures

    copy = tmp_path / "out.jsonl"
    shutil.copyfile(out, copy)
    for broken in ("{not json", "[1, 2]", "", '{"summary": [1], "status": 3}'):
        (tmp_path / "out.jsonl.run.json").write_text(broken)
        result = show(copy, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "12 rows, 9 captioned, 3 failed" in result.stdout
        assert ("run: out.jsonl.run.json" in result.stdout) == (broken[:1] != "{" or
                                                                broken == "{not json")


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("missing.jsonl", None, "no such file"),
        ("folder.jsonl", "<dir>", "is a folder"),
        ("latin1.jsonl", b'{"caption": "caf\xe9"}\n', "not UTF-8"),
        ("cut.json", b'[{"caption": "a"}, {"capt', "not valid JSON"),
        ("object.json", b'{"caption": "a"}', "expected a JSON array"),
        ("notes.txt", b"hello", "not a capflow output"),
    ],
)
def test_unreadable_files_are_one_line_and_exit_2(tmp_path, name, content, says):
    path = tmp_path / name
    if content == "<dir>":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = show(path, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("capflow show: error: ") and says in lines[0]


def test_bad_html_destinations_are_one_line(run, tmp_path):
    out, _ = run
    before = out.read_bytes()
    for html, says in ((tmp_path, "is a folder"), (tmp_path / "no" / "g.html", "does not exist"),
                       (out, "would overwrite the output")):
        result = show(out, "--html", html, cwd=tmp_path)
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1 and says in result.stderr
    assert not list(tmp_path.iterdir())
    assert out.read_bytes() == before


def test_a_large_output_is_streamed(tmp_path, capsys):
    """40,000 rows: memory stays flat (the file is 5.6 MB; the peak well under 2 MB)."""
    from capflow.show import main

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(40_000):
            row: dict = {"id": f"{i:06d}", "image": [f"images/{i}.png"]}
            if i % 10 == 3:
                row["_error"] = {"type": ["Timeout", "ServerError"][i % 20 == 3],
                                 "message": f"failed {i}", "stage": "request"}
            else:
                row["caption"] = f"caption of row {i} " + "x" * 60
            f.write(json.dumps(row) + "\n")
    tracemalloc.start()
    try:
        assert main([str(path)]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = capsys.readouterr().out
    assert "40,000 rows, 36,000 captioned, 4,000 failed" in text
    assert re.search(r"\n  ServerError +2,000 +e\.g\. row 3: failed 3\n", text)
    assert re.search(r"\n  Timeout +2,000 +e\.g\. row 13: failed 13\n", text)
    # The middle of the first of 5 stretches of captioned rows: the 3,600th, row 4,000.
    assert "\n  row 4000 (id 004000) images/4000.png: caption of row 4000 x" in text
    assert peak < 2_000_000, peak


# -- the gallery page ------------------------------------------------------------------------


class _Page(HTMLParser):
    """The parts of the page the tests look at: each row section's images, caption and error,
    every tag's name, and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict] = {}
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.text: list[str] = []
        self._row: dict | None = None
        self._into: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "row" in classes:
            self._row = {"classes": classes, "imgs": [], "caption": None, "error": "",
                         "missing": "", "links": []}
            self.rows[int(a["id"].removeprefix("row-"))] = self._row
        elif tag == "img":
            self.srcs.append(a["src"])
            if self._row is not None:
                self._row["imgs"].append(a)
        elif tag == "a" and self._row is not None:
            self._row["links"].append(a["href"])
        elif tag == "p" and "caption" in classes:
            self._into = "caption"
            self._row["caption"] = ""
        elif tag == "p" and "error" in classes:
            self._into = "error"
        elif tag == "div" and "missing" in classes:
            self._into = "missing"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("p", "div"):
            self._into = None
        if tag == "section":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._into and self._row is not None:
            self._row[self._into] += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _thumbnail(src: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    img.load()
    assert img.format == "JPEG"
    return img


def test_gallery_shows_every_row_with_its_image_and_caption(run, tmp_path):
    out, rows = run
    html = tmp_path / "gallery.html"
    result = show(out, "--html", html, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    readable = [i for i in range(ROWS) if i not in MISSING and i != NOT_AN_IMAGE]
    assert f"gallery: {html} (12 rows, 9 images, 3 not found or unreadable)" in result.stdout
    page = parse(html)
    # Relative image paths are found through the run manifest's input, not the output's folder.
    assert "(the folder of the manifest's input)" in "".join(page.text)
    assert "script" not in page.tags
    assert "12 rows, 9 captioned, 3 failed" in "".join(page.text)
    assert sorted(page.rows) == list(range(ROWS))
    for i, row in enumerate(rows):
        shown = page.rows[i]
        if "caption" in row:
            assert shown["caption"] == row["caption"]
            assert "failed" not in shown["classes"]
        else:
            error = row["_error"]
            assert "failed" in shown["classes"]
            assert shown["error"] == f"{error['type']} {error['message']}"
            assert shown["caption"] is None
        if i in readable:
            (img,) = shown["imgs"]
            thumb = _thumbnail(img["src"])
            assert max(thumb.size) <= 256
            assert (int(img["width"]), int(img["height"])) == thumb.size
        else:
            assert shown["imgs"] == []
            says = "image not found" if i in MISSING else "not an image"
            assert says in shown["missing"]
    # Every image on the page is an embedded JPEG, one per row with a readable image.
    assert len(page.srcs) == len(readable)
    big = _thumbnail(page.rows[BIG]["imgs"][0]["src"])
    assert big.size == (192, 256)  # upright: EXIF orientation 6 turns 800x600 to 600x800


def test_gallery_limit_says_how_many_rows_are_left_out(run, tmp_path):
    out, _ = run
    html = tmp_path / "g.html"
    result = show(out, "--html", html, "--limit", "5", cwd=out.parent)
    assert result.returncode == 0, result.stderr
    page = parse(html)
    assert sorted(page.rows) == [0, 1, 2, 3, 4]
    assert "shows the first 5 rows; 7 more are left out" in "".join(page.text)
    # The samples still come from the whole file.
    assert "samples (5 of 9 captioned rows)" in result.stdout


def test_images_are_found_from_root_or_manifest(run, tmp_path):
    out, _ = run
    elsewhere = tmp_path / "out.jsonl"
    shutil.copyfile(out, elsewhere)
    html = tmp_path / "g.html"
    data_dir = out.parent.parent / "data"

    assert show(elsewhere, "--html", html, cwd=tmp_path).returncode == 0
    page = parse(html)
    assert page.srcs == []  # relative to the output's own folder: nothing there
    assert "image not found" in page.rows[0]["missing"]
    assert "(the output's folder)" in "".join(page.text)

    assert show(elsewhere, "--html", html, "--root", data_dir, cwd=tmp_path).returncode == 0
    assert len(parse(html).srcs) == 9

    (tmp_path / "out.jsonl.run.json").write_text(
        json.dumps({"config": {"input": str(data_dir / "data.json")}}))
    assert show(elsewhere, "--html", html, cwd=tmp_path).returncode == 0
    page = parse(html)
    assert len(page.srcs) == 9
    assert "(the folder of the manifest's input)" in "".join(page.text)


def test_gallery_escapes_text_and_never_fetches_or_hangs(tmp_path):
    png = io.BytesIO()
    Image.new("RGBA", (300, 100), (0, 0, 255, 100)).save(png, "PNG")
    (tmp_path / "alpha.png").write_bytes(png.getvalue())
    os.mkfifo(tmp_path / "fifo.png")  # opening it for reading would wait for a writer
    data_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    rows = [
        {"image": "alpha.png", "caption": "<script>alert(1)</script>\nsecond line & more"},
        {"image": ["https://example.com/a.jpg", data_uri], "caption": "remote \x1b[31mred"},
        {"image": "fifo.png", "caption": "a fifo"},
        {"image": "/no/such/dir/x.png", "_error": {"type": "Bad<b>", "message": "<i>m</i>"}},
        {"caption": "no image at all"},
    ]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = tmp_path / "g.html"
    result = show(out, "--html", html, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = parse(html)
    assert set(page.tags) <= {"html", "head", "meta", "title", "style", "body", "h1", "pre",
                              "table", "tr", "th", "td", "a", "p", "main", "section", "div",
                              "figure", "img", "figcaption", "h2", "span", "strong"}
    assert page.rows[0]["caption"] == "<script>alert(1)</script>\nsecond line & more"
    assert page.rows[1]["caption"] == "remote red"
    assert page.rows[1]["links"] == ["https://example.com/a.jpg"]
    assert len(page.rows[1]["imgs"]) == 1  # the data: URI, thumbnailed
    assert "not a regular file" in page.rows[2]["missing"]
    assert page.rows[3]["error"] == "Bad<b> <i>m</i>"
    assert "no image in this row" in page.rows[4]["missing"]
    assert all(src.startswith("data:image/jpeg;base64,") for src in page.srcs)
    assert "Content-Security-Policy" in html.read_text()


# -- in a real browser -----------------------------------------------------------------------


def _browser() -> str:
    pytest.importorskip("playwright.sync_api",
                        reason="the playwright package is not installed (pip install playwright)")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no Chromium browser on PATH (Debian: apt-get install chromium)")
    return found


def test_gallery_in_a_headless_browser(run, tmp_path):
    executable = _browser()
    from playwright.sync_api import sync_playwright

    out, rows = run
    html = tmp_path / "gallery.html"
    assert show(out, "--html", html, cwd=out.parent).returncode == 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.as_uri())
            widths = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : -1)")
            assert len(widths) == 9 and all(w > 0 for w in widths), widths
            for i, row in enumerate(rows):
                section = page.locator(f"#row-{i}")
                if "caption" in row:
                    caption = section.locator("p.caption")
                    assert caption.is_visible()
                    assert caption.inner_text() == row["caption"]
                else:
                    error = section.locator("p.error")
                    assert error.is_visible()
                    assert row["_error"]["type"] in error.inner_text()
            # The page loaded nothing but itself and its own data: URIs.
            assert [u for u in requests if not u.startswith("data:")] == [html.as_uri()]
        finally:
            browser.close()

