"""FileStorage reads JSON arrays and JSON Lines as streams and writes rows back unchanged."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

from capflow.errors import ConfigError
from capflow.rows import Row
from capflow.storage import FileStorage, json_stream
from capflow.storage.json_stream import iter_json_array


def test_json_array_streams_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(json_stream, "_CHUNK", 7)  # tiny chunks: every row spans several
    rows = [{"id": f"{i:04d}", "n": 12345678901234567890 + i, "f": 1e5, "s": "a/b"}
            for i in range(50)]
    text = json.dumps(rows, indent=2)
    got = list(iter_json_array(io.StringIO(text), "t.json"))
    assert [value for value, _ in got] == rows
    assert all(json.loads(raw) == value for value, raw in got)


def test_top_level_numbers_are_not_cut_at_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(json_stream, "_CHUNK", 3)
    assert [v for v, _ in iter_json_array(io.StringIO("[12345, 678]"), "t")] == [12345, 678]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}', "expected a JSON array"),
        ('[{"a": 1}', "not closed"),
        ('[{"a": 1} {"b": 2}]', "expected ',' or ']' after row 1"),
        ('[{"a": 1}, {"b": }]', "row 2 is not valid JSON"),
    ],
)
def test_broken_json_arrays_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        list(iter_json_array(io.StringIO(text), "t.json"))


def test_jsonl_bad_line_becomes_an_error_row_not_a_crash(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1"}\nnot json\n\n[1, 2]\n{"id": "2"}\n')
    rows = list(FileStorage(str(path)).step().read())
    assert [r.data.get("id") for r in rows] == ["1", None, None, "2"]
    assert rows[1].error.startswith(f"{path}:2: not valid JSON")
    assert rows[2].error == f"{path}:4: a row must be a JSON object"
    assert rows[1].data == {"_raw": "not json"}


def test_row_output_keeps_every_field_byte_for_byte():
    raw = '{"id": "0012", "x": 1e5, "p": "a/b", "u": "caf\\u00e9", "n": null}'
    row = Row(0, json.loads(raw), raw)
    assert row.with_fields({"caption": "é/x"}) == raw[:-1] + ', "caption": "é/x"}'
    assert Row(0, {}, "{}").with_fields({"c": 1}) == '{"c": 1}'


def test_existing_output_key_is_replaced_not_duplicated():
    raw = '{"id": "1", "caption": "old"}'
    line = Row(0, json.loads(raw), raw).with_fields({"caption": "new"})
    assert json.loads(line) == {"id": "1", "caption": "new"} and line.count("caption") == 1


def test_pretty_printed_rows_fold_to_one_line_with_values_intact():
    raw = '{\n  "id": "0012",\n  "image": [\n    "a b.png"\n  ]\n}'
    line = Row(0, json.loads(raw), raw).with_fields({"caption": "c"})
    assert line == '{"id": "0012", "image": ["a b.png"], "caption": "c"}'


def test_steps_chain_files_and_resolve_images_from_the_dataset(tmp_path):
    data = tmp_path / "sub" / "d.json"
    data.parent.mkdir()
    data.write_text('[{"id": "1"}]')
    storage = FileStorage(str(data), cache_path=str(tmp_path / "c"), file_name_prefix="p",
                          cache_type="json")
    first, second = storage.step(), storage.step()
    assert first.input_path == str(data)
    assert first.output_path == str(tmp_path / "c" / "p_step1.json")
    assert second.input_path == first.output_path
    assert second.base_dir == data.parent.resolve()
    first.write(['{"id": "1", "caption": "x"}'])
    assert json.loads((tmp_path / "c" / "p_step1.json").read_text()) == [
        {"id": "1", "caption": "x"}
    ]
    assert [r.data for r in second.read()] == [{"id": "1", "caption": "x"}]
    assert storage.step(output=str(tmp_path / "o.jsonl")).output_path == str(tmp_path / "o.jsonl")


def test_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="input file not found: .*nope.json"):
        list(FileStorage(str(tmp_path / "nope.json")).step().read())


# --- writing the output -------------------------------------------------------------------------

_DISK_FULL_CHILD = """\
import resource, signal, sys
from capflow.errors import CapflowError
from capflow.storage import FileStorage
# The write fails with EFBIG instead of the process being killed by SIGXFSZ.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
storage = FileStorage(sys.argv[1]).step(output=sys.argv[2])
try:
    storage.write('{"id": "%05d", "caption": "%s"}' % (i, "x" * 80) for i in range(1000))
except CapflowError as exc:
    print(exc)
    sys.exit(3)
"""


def _folder_listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_replaces_the_output_and_leaves_no_temporary_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "1"}\n')
    storage = FileStorage(str(tmp_path / "d.jsonl")).step(output=str(tmp_path / "o" / "out.json"))
    storage.write(['{"id": "1", "caption": "a"}'])
    storage.write(['{"id": "1", "caption": "b"}', '{"id": "2", "caption": "c"}'])
    assert json.loads((tmp_path / "o" / "out.json").read_text()) == [
        {"id": "1", "caption": "b"}, {"id": "2", "caption": "c"}
    ]
    assert _folder_listing(tmp_path / "o") == ["out.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_output_has_the_mode_open_would_give_it(tmp_path, umask):
    (tmp_path / "d.jsonl").write_text('{"id": "1"}\n')
    out = tmp_path / "out.jsonl"
    old = os.umask(umask)
    try:
        FileStorage(str(tmp_path / "d.jsonl")).step(output=str(out)).write(['{"id": "1"}'])
        (tmp_path / "plain").write_text("")  # what the user's own tools would create
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_a_replaced_output_keeps_the_mode_it_was_given(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "1"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    out.chmod(0o640)
    FileStorage(str(tmp_path / "d.jsonl")).step(output=str(out)).write(['{"id": "1"}'])
    assert out.read_text() == '{"id": "1"}\n' and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_two_writes_at_once_use_two_temporary_files_and_never_mix(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "1"}\n')
    out = tmp_path / "out.jsonl"
    both_writing = threading.Barrier(3, timeout=10)

    def rows(tag: str):
        for i in range(500):
            yield json.dumps({"id": f"{i:04d}", "caption": tag * 50})
            if i == 250:
                both_writing.wait()  # both writers are halfway through their temp files
                both_writing.wait()  # the main thread has looked at the folder

    writers = [
        threading.Thread(target=FileStorage(str(tmp_path / "d.jsonl")).step(output=str(out)).write,
                         args=(rows(tag),))
        for tag in "ab"
    ]
    for w in writers:
        w.start()
    both_writing.wait()
    seen = _folder_listing(tmp_path)
    both_writing.wait()
    for w in writers:
        w.join(10)
    temps = [n for n in seen if n.startswith(".out.jsonl.") and n.endswith(".tmp")]
    assert len(temps) == 2 and len(set(temps)) == 2, seen
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(final) == 500 and len({r["caption"] for r in final}) == 1  # one writer's, whole
    assert _folder_listing(tmp_path) == ["d.jsonl", "out.jsonl"]


def test_a_failed_write_keeps_the_old_output_and_removes_its_temporary_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": "1"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "1", "caption": "old"}\n')

    def rows():
        yield '{"id": "1", "caption": "new"}'
        raise sqlite3.OperationalError("disk I/O error")  # the journal failing mid-read

    with pytest.raises(sqlite3.OperationalError):
        FileStorage(str(tmp_path / "d.jsonl")).step(output=str(out)).write(rows())
    assert out.read_text() == '{"id": "1", "caption": "old"}\n'
    assert _folder_listing(tmp_path) == ["d.jsonl", "out.jsonl"]


def test_a_full_disk_is_a_one_line_error_and_the_old_output_stays(tmp_path):
    """A real EFBIG: the write runs in a process whose file size limit is 4 KB."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1"}\n')
    out = tmp_path / "out.jsonl"
    old = "".join(f'{{"id": "{i:05d}", "caption": "old"}}\n' for i in range(300))  # > 4 KB
    out.write_text(old)
    child = subprocess.run([sys.executable, "-c", _DISK_FULL_CHILD, str(data), str(out)],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 3, child.stderr
    assert child.stdout == (
        f"cannot write {out}: File too large; the finished rows are kept in the journal"
        f" {out}.journal.sqlite, free some space and run the same command again\n"
    )
    assert out.read_text() == old
    assert _folder_listing(tmp_path) == ["d.jsonl", "out.jsonl"]


# --- JSON arrays: where a problem is -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])  # problems anywhere relative to the chunks
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n  {"a": 1},\n  {"b": tru}\n]',
         "t.json:3:9: row 2 is not valid JSON (Expecting value) near '{\"b\": tru}"),
        ('[\n  {"a": "x\ty"}\n]',
         "t.json:2:11: row 1 is not valid JSON (a control character ('\\t') inside a string)"),
        ('[\n  {"a": 1},\n  {"b": "open}\n]',  # found where the line ends
         "t.json:3:15: row 2 is not valid JSON (a string is not closed)"),
        ('[\n  {"a": 1},\n  {"b": "open}',  # the file ends: said where the string starts
         "t.json:3:9: row 2 is not valid JSON (a string is not closed)"),
        ('[{"a": 1},\n]', "t.json:2:1: a comma before the closing ']' (JSON allows no comma"
                          " after the last row)"),
        ('[{"a": 1}]\n[{"b": 2}]', "t.json:2:1: text after the end of the JSON array: '["),
        ('[{"a": 1}\n {"b": 2}]', "t.json:2:2: expected ',' or ']' after row 1, found '{"),
        ('[{"a": 1},\n', "t.json:2:1: the JSON array is not closed (no ']' at the end)"),
        ('{"a": 1}\n{"a": 2}\n', "t.json:1:1: expected a JSON array of rows (starting with '[');"
                                 " the file looks like JSON Lines (one object per line): name"
                                 " it .jsonl"),
        ("id,image\n1,a.png\n", "t.json:1:1: expected a JSON array of rows (starting with '[');"
                                " the file looks like comma-separated values: name it .csv"),
        ("  ", "t.json: the file is empty; a .json input is a JSON array of rows"),
    ],
)
def test_json_array_problems_name_their_line_and_column(monkeypatch, chunk, text, message):
    monkeypatch.setattr(json_stream, "_CHUNK", chunk)
    with pytest.raises(ConfigError) as err:
        list(iter_json_array(io.StringIO(text), "t.json"))
    # What follows the place is shown as far as the chunk in memory goes.
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# --- a folder of images ----------------------------------------------------------------------


def _touch(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # the walk goes by names: what is in a file is the image reader's


def _ids(folder) -> list[str]:
    rows = list(FileStorage(str(folder)).step().read())
    for row in rows:
        assert row.data == {"id": row.data["id"], "image": [row.data["id"]]}
        assert json.loads(row.raw) == row.data and row.error is None
    return [row.data["id"] for row in rows]


def test_a_folder_gives_its_images_sorted_by_relative_path(tmp_path):
    photos = tmp_path / "photos"
    images = ["a.png", "a/b.png", "a-b.png", "a0.png", "B.PNG", "c.JpEg", "d.png/in.png",
              "sub/deeper/x.webp", "z.tif", "z.tiff", "y.gif", "x.bmp", "w.jpg", "é.png"]
    for name in images:
        _touch(photos / name)
    for name in [".h.png", ".hidden/x.png", "sub/.cache/y.png", "notes.txt", "x.png.bak",
                 "sub/README"]:
        _touch(photos / name)
    if hasattr(os, "mkfifo"):
        os.mkfifo(photos / "fifo.png")  # not a regular file: never an image
    assert _ids(photos) == sorted(images)  # "a-b.png" < "a.png" < "a/b.png" < "a0.png"
    storage = FileStorage(str(photos) + "/").step()
    assert storage.base_dir == photos.resolve()  # the image root
    assert storage.count() == len(images)


def test_folder_symlinks_out_are_skipped_and_loops_end(tmp_path):
    photos = tmp_path / "photos"
    _touch(photos / "inside.png")
    _touch(photos / "sub" / "s.png")
    _touch(tmp_path / "outside.png")
    _touch(tmp_path / "away" / "far.png")
    os.symlink(photos / "inside.png", photos / "link_in.png")  # inside: followed
    os.symlink(tmp_path / "outside.png", photos / "out.png")  # out of the folder: skipped
    os.symlink(tmp_path / "away", photos / "away")
    os.symlink(photos, photos / "loop")  # the folder itself: never walked twice
    os.symlink("..", photos / "sub" / "up")
    os.symlink(photos / "sub", photos / "alias")  # another folder inside: walked
    assert _ids(photos) == ["alias/s.png", "inside.png", "link_in.png", "sub/s.png"]


def test_a_file_name_that_is_not_utf8_fails_its_row_only(tmp_path):
    photos = tmp_path / "photos"
    _touch(photos / "good.png")
    os.close(os.open(os.fsencode(photos) + b"/caf\xe9.png", os.O_CREAT | os.O_WRONLY))
    rows = list(FileStorage(str(photos)).step().read())
    assert rows[0].error == f"{photos}/caf\ufffd.png: the file name is not valid UTF-8; rename" \
                            " the file"
    assert rows[1].data["id"] == "good.png" and rows[1].error is None


def test_a_folder_identity_follows_its_set_of_images(tmp_path):
    photos = tmp_path / "photos"
    _touch(photos / "a.png")
    _touch(photos / "sub" / "b.png")

    def identity() -> str:
        view = FileStorage(str(photos)).step()
        view.check()
        assert view.input_identity() == FileStorage(str(photos)).step().input_identity()
        return view.input_identity()

    first = identity()
    (photos / "notes.txt").write_text("x")
    (photos / "a.png").write_bytes(b"other bytes")
    assert identity() == first  # the same images: a resumed run may skip the rows done
    _touch(photos / "c.png")
    assert identity() != first
    (photos / "c.png").unlink()
    assert identity() == first
    (photos / "sub" / "b.png").rename(photos / "sub" / "b2.png")
    assert identity() != first


# --- CSV and TSV -------------------------------------------------------------------------------


def test_csv_rows_keep_their_cells_and_give_the_operator_an_image_list(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b'\xef\xbb\xbfid,photo,note\n'
        b'0012,a.png,"x, ""y""\nz"\n'
        b"\n"
        b"0013,,empty\n"
        b"0014,b.png\n"
        b"0015,c.png,too,many\n"
    )
    rows = list(FileStorage(str(path), image_column="photo").step().read())
    assert rows[0].data == {"id": "0012", "photo": "a.png", "note": 'x, "y"\nz',
                            "image": ["a.png"]}
    assert json.loads(rows[0].with_fields({"caption": "c"})) == {**rows[0].data, "caption": "c"}
    assert rows[1].data["image"] == [] and rows[1].error is None  # the operator's NoImage
    assert rows[2].error == f"{path}:6: 2 cells where the header has 3 columns"
    assert rows[2].data == {"_raw": "0014,b.png"}
    assert rows[3].error == f"{path}:7: 4 cells where the header has 3 columns"
    assert [r.index for r in rows] == [0, 1, 2, 3]


def test_an_image_column_is_used_as_it_is_and_an_empty_cell_kept(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('id\timage\tnote\n1\ta b.png\t"tab\there"\n2\t\tnone\n')
    rows = list(FileStorage(str(path)).step().read())
    assert rows[0].data == {"id": "1", "image": "a b.png", "note": "tab\there"}
    assert rows[1].data["image"] == []  # no image: NoImage, not a bad reference
    assert json.loads(rows[1].with_fields({"x": 1})) == {"id": "2", "image": "", "note": "none",
                                                         "x": 1}


@pytest.mark.parametrize(("header", "column"), [
    ("id,url,path", "path"), ("id,URL", "URL"), ("Image Path,file", "file"),
    (" Image ,file", " Image "),
])
def test_the_image_column_is_the_first_known_name_the_header_has(tmp_path, header, column):
    path = tmp_path / "d.csv"
    path.write_text(header + "\n" + ",".join(f"v{i}" for i in range(header.count(",") + 1)))
    (row,) = FileStorage(str(path)).step().read()
    assert row.data["image"] == [row.data[column]]


# --- CSV and TSV output ------------------------------------------------------------------------

_FINISHED = [
    '{"id": "1", "image": ["a.png"], "n": 1e5, "caption": "x, \\"y\\"\\nz"}',
    '{"id": "2", "image": [], "_error": {"type": "NoImage", "message": "m", "stage": "prepare"}}',
    '{"_raw": "3,b", "_error": {"type": "BadRow", "message": "d.csv:4: 2 cells", "stage": "p"}}',
    '{"id": "4", "image": ["é.png"], "extra": null, "caption": "ok"}',
]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_csv_output_has_every_column_once_and_cells_as_text(tmp_path, suffix):
    (tmp_path / "d.csv").write_text("id,image\n")
    out = tmp_path / "o" / f"out{suffix}"
    FileStorage(str(tmp_path / "d.csv")).step(output=str(out)).write(iter(_FINISHED))
    with open(out, encoding="utf-8", newline="") as f:
        table = list(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","))
    assert table == [
        ["id", "image", "n", "caption", "extra", "_raw", "_error"],
        ["1", '["a.png"]', "100000.0", 'x, "y"\nz', "", "", ""],
        ["2", "[]", "", "", "", "",
         '{"type":"NoImage","message":"m","stage":"prepare"}'],
        ["", "", "", "", "", "3,b", '{"type":"BadRow","message":"d.csv:4: 2 cells","stage":"p"}'],
        ["4", '["é.png"]', "", "ok", "null", "", ""],
    ]
    once = out.read_bytes()
    # From rows that can be read twice (no copy), the same bytes; no temporary file is left.
    FileStorage(str(tmp_path / "d.csv")).step(output=str(out)).write(list(_FINISHED))
    assert out.read_bytes() == once
    assert _folder_listing(tmp_path / "o") == [out.name]
