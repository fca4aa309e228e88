"""Bad inputs and outputs are one-line errors found before anything is created or sent:
FileStorage.check(), and the real command on a missing, non-UTF-8 or misplaced file."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from conftest import make_dataset, run_capflow

from capflow.errors import ConfigError
from capflow.storage import FileStorage, json_stream
from capflow.storage.json_stream import check_utf8


def _where_invalid(data: bytes) -> tuple[int, int]:
    """(line, offset) of the first byte that is not UTF-8, found the slow, obvious way."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data[: exc.start].count(b"\n") + 1, exc.start
    raise AssertionError("valid UTF-8")


def _check(input_path, output=None) -> None:
    FileStorage(str(input_path)).step(output=str(output) if output else None).check()


# --- the UTF-8 scan -----------------------------------------------------------------------------

_TEXT = "ligne é\n日本語 🙂\n" * 5  # one- to four-byte characters, cut anywhere by small chunks


# (bytes read at once, bytes decoded at once): reads and decoder slices cut characters anywhere.
_SIZES = [(1, 1), (2, 1), (3, 2), (5, 16), (7, 3), (64, 5), (64, 64), (1 << 20, 16 << 10)]


@pytest.mark.parametrize(("chunk", "piece"), _SIZES)
def test_characters_cut_by_chunk_boundaries_are_valid(monkeypatch, chunk, piece):
    monkeypatch.setattr(json_stream, "_SCAN_CHUNK", chunk)
    monkeypatch.setattr(json_stream, "_DECODE_SLICE", piece)
    check_utf8(io.BytesIO(_TEXT.encode()), "t.jsonl")
    check_utf8(io.BytesIO(b"ascii only\n" * 10 + _TEXT.encode()), "t.jsonl")


@pytest.mark.parametrize(("chunk", "piece"), _SIZES)
@pytest.mark.parametrize(
    "bad",
    [
        b"\xff",  # never valid
        b"\xe9t\xc3\xa9",  # Latin-1 "é" then a real one
        "日".encode()[:2] + b"\n",  # a character cut short
        b"\xed\xa0\x80",  # an encoded surrogate
        b"\xc0\xaf",  # an overlong "/"
    ],
)
def test_the_first_invalid_byte_is_named_by_line_and_offset(monkeypatch, chunk, piece, bad):
    monkeypatch.setattr(json_stream, "_SCAN_CHUNK", chunk)
    monkeypatch.setattr(json_stream, "_DECODE_SLICE", piece)
    data = b"ascii\n" * 7 + _TEXT.encode() + b'{"id": "' + bad + b'"}\n' + _TEXT.encode()
    line, offset = _where_invalid(data)
    with pytest.raises(ConfigError) as err:
        check_utf8(io.BytesIO(data), "d.jsonl")
    assert str(err.value) == (f"d.jsonl:{line}: not valid UTF-8 (byte 0x{data[offset]:02x} at"
                              f" offset {offset}); save the file as UTF-8")


@pytest.mark.parametrize(("chunk", "piece"), _SIZES)
def test_a_file_ending_inside_a_character_is_invalid(monkeypatch, chunk, piece):
    monkeypatch.setattr(json_stream, "_SCAN_CHUNK", chunk)
    monkeypatch.setattr(json_stream, "_DECODE_SLICE", piece)
    data = b'{"a": "b"}\n"' + "🙂".encode()[:3]
    with pytest.raises(ConfigError, match=r"^d.jsonl:2: not valid UTF-8 \(byte 0xf0 at offset 12"):
        check_utf8(io.BytesIO(data), "d.jsonl")


def test_utf16_is_named_as_such(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"id": "1"}\n'.encode("utf-16"))  # with its byte order mark
    with pytest.raises(ConfigError, match=f"^{path}: the file is UTF-16 text, not UTF-8; save"):
        _check(path)


def test_a_utf8_byte_order_mark_is_accepted_and_not_part_of_the_first_row(tmp_path):
    for name, text in [("d.jsonl", '{"id": "1"}\n{"id": "2"}\n'), ("d.json", '[{"id": "1"}]')]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        storage = FileStorage(str(path)).step()
        storage.check()
        rows = list(storage.read())
        assert rows[0].data == {"id": "1"} and rows[0].error is None


def test_read_without_check_still_names_the_invalid_byte(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "1"}\n{"id": "\xff"}\n')
    with pytest.raises(ConfigError, match=rf"^{path}:2: not valid UTF-8 \(byte 0xff at offset 20"):
        list(FileStorage(str(path)).step().read())


def test_lines_that_are_not_json_stay_per_row_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1"}\nnot json é\n')
    storage = FileStorage(str(path)).step()
    storage.check()  # valid UTF-8: the bad line is the row's problem, not the run's
    rows = list(storage.read())
    assert rows[0].error is None and rows[1].error.startswith(f"{path}:2: not valid JSON")


# --- check() on inputs and outputs ------------------------------------------------------------


def test_a_good_input_and_output_pass_and_nothing_is_created(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1"}\n')
    _check(data, tmp_path / "new" / "deeper" / "out.jsonl")
    FileStorage(str(data), cache_path=str(tmp_path / "cache")).step().check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_input_problems_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=f"^input file not found: {tmp_path}/nope.jsonl$"):
        _check(tmp_path / "nope.jsonl")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="^input file not found: .*afile/d.jsonl$"):
        _check(tmp_path / "afile" / "d.jsonl")
    # A folder is a folder of images, whatever its name: one without any is refused.
    (tmp_path / "folder.jsonl" / ".hidden").mkdir(parents=True)
    (tmp_path / "folder.jsonl" / "notes.txt").write_text("")
    (tmp_path / "folder.jsonl" / ".hidden" / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"^input folder {tmp_path}/folder.jsonl has no images"
                                          r" \(\.bmp, .*; hidden files and folders are skipped\)$"):
        _check(tmp_path / "folder.jsonl")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_input_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(ConfigError, match="^input is not a regular file: .*pipe.jsonl$"):
        _check(tmp_path / "pipe.jsonl")


_NOBODY = 65534


def _check_as_a_user(input_path: Path, output: Path) -> str:
    """``check()``'s error message (or "") in a child process that is not root, since root may
    read and write anything: it drops to the user nobody when the tests run as root."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(_NOBODY)
                os.setuid(_NOBODY)
            try:
                _check(input_path, output)
                message = ""
            except ConfigError as exc:
                message = str(exc)
            except BaseException as exc:  # noqa: BLE001 - shown by the parent's assertion
                message = f"unexpected {exc!r}"
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def shared_dir():
    """A folder that the user nobody can reach (pytest's tmp_path is private to root)."""
    with tempfile.TemporaryDirectory() as name:
        os.chmod(name, 0o755)
        yield Path(name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and file modes")
def test_an_unreadable_input_is_a_one_line_error(shared_dir):
    data = shared_dir / "d.jsonl"
    data.write_text('{"id": "1"}\n')
    data.chmod(0)
    message = _check_as_a_user(data, shared_dir / "out.jsonl")
    assert message == f"cannot read input file {data}: Permission denied"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and file modes")
def test_an_output_folder_that_is_not_writable_is_a_one_line_error(shared_dir):
    data = shared_dir / "d.jsonl"
    data.write_text('{"id": "1"}\n')
    data.chmod(0o644)
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)
    message = _check_as_a_user(data, locked / "new" / "out.jsonl")
    assert message == (f"cannot write the output {locked}/new/out.jsonl: the folder {locked} is"
                       " not writable")
    writable = shared_dir / "open"
    writable.mkdir()
    writable.chmod(0o777)
    assert _check_as_a_user(data, writable / "new" / "out.jsonl") == ""  # the same user can


def test_output_problems_are_one_line_errors(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "1"}\n')
    (tmp_path / "out.jsonl").mkdir()
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError) as err:
        _check(data, out)
    assert str(err.value) == f"output is a folder: {out}; name a file such as {out}/captions.jsonl"
    with pytest.raises(ConfigError, match=f"^output is a folder: {tmp_path}; name a file such as"):
        _check(data, tmp_path)  # no suffix: found when the step is made
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ConfigError) as err:
        _check(data, tmp_path / "notes.txt" / "sub" / "out.jsonl")
    assert str(err.value) == (f"cannot write the output {tmp_path}/notes.txt/sub/out.jsonl:"
                              f" {tmp_path}/notes.txt is a file, not a folder")
    # A device: the output is put in place by a rename, which would replace the device itself.
    os.symlink("/dev/null", tmp_path / "null.jsonl")
    with pytest.raises(ConfigError, match=f"^output is not a regular file: {tmp_path}/null.jsonl$"):
        _check(data, tmp_path / "null.jsonl")


# --- check() reads the whole input: syntax, formats, columns -----------------------------------


def test_a_json_syntax_error_anywhere_is_found_by_check_with_its_place(tmp_path):
    rows = [{"id": f"{i:05d}", "image": ["a.png"]} for i in range(5000)]
    text = json.dumps(rows, indent=1)
    where = text.rindex('"04990"')
    path = tmp_path / "d.json"
    path.write_text(text[:where] + "04990" + text[where + 7:])  # an unquoted string
    line = text.count("\n", 0, where) + 1
    column = where - text.rindex("\n", 0, where) + 1  # "0" is a number; "4990" follows it
    with pytest.raises(ConfigError, match=rf"^{path}:{line}:{column}: row 4991 is not valid JSON"
                                          r" \(Expecting ',' delimiter\) near "):
        _check(path)
    good = tmp_path / "good.json"
    good.write_text(text)
    storage = FileStorage(str(good)).step()
    storage.check()
    assert storage.count(cheap_only=True) == 5000  # counted by check(): no second pass


@pytest.mark.parametrize(("first", "looks"), [
    ("id,image", "comma-separated values: name it .csv"),
    ("id\timage", "tab-separated values: name it .tsv"),
    ('[{"id": "1"},', "a JSON array of rows: name it .json"),
    ("{", "JSON spread over several lines: JSON Lines has one whole object per line (a JSON"
          " array of rows goes in a .json file)"),
    ("<html>", "HTML or XML"),
])
def test_a_jsonl_file_that_is_not_json_lines_is_named_for_what_it_looks_like(tmp_path, first,
                                                                               looks):
    path = tmp_path / "d.jsonl"
    path.write_text(f"\n{first}\n" + '{"id": "1"}\n')
    with pytest.raises(ConfigError) as err:
        _check(path)
    assert re.fullmatch(rf"{re.escape(str(path))}:2: the first row is not JSON \([^)]*\); the"
                        rf" file looks like {re.escape(looks)}", str(err.value)), err.value


def test_a_jsonl_file_holding_one_json_array_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('[{"id": "1"}, {"id": "2"}]\n')
    with pytest.raises(ConfigError, match=f"^{path}:1: the first row is a JSON array, not a row;"
                                          " the file looks like a JSON array of rows: name it"
                                          r" \.json$"):
        _check(path)


_TABLE_PROBLEMS = [
    ("d.csv", "", None, "{p} is empty: a CSV file starts with a header row naming its columns"),
    ("d.tsv", "\n\n", None, "{p} is empty: a TSV file starts with a header row naming its"
                           " columns"),
    ("d.csv", "id,id,image\n", None, "{p}:1: the header names the column 'id' twice; give each"
                                     " column its own name"),
    ("d.csv", "id,photo\n", "pic", "{p} has no column 'pic' (storage.image_column); its columns:"
                                   " id, photo"),
    ("d.csv", "id,image,photo\n", "photo", "{p} has an 'image' column as well as"
                                           " storage.image_column=photo: rename one of them"),
    ("d.csv", "id,picture\n1,a.png\n", None, "{p} has no image column (its columns: id,"
                                              " picture); set storage.image_column to the column"
                                              " with the image paths or URLs"),
    ("d.csv", '{"id": "1", "image": "a.png"}\n', None, "{p} has no image column (its columns:"
     ' {{"id": "1", "image": "a.png"}}); set storage.image_column to the column with the image'
     " paths or URLs; the file looks like JSON: name it .json (an array) or .jsonl"),
    ("d.csv", "id\timage\n", None, "{p} has no image column (its columns: id image); set"
     " storage.image_column to the column with the image paths or URLs; the file looks"
     " tab-separated: name it .tsv"),
    ("d.csv", 'id,image\n1,a.png\n2,"b.png\n3,c.png\n', None, "{p}:3: a quoted cell that"
     " starts on this line is never closed (a missing '\"')"),
]


@pytest.mark.parametrize(("name", "text", "column", "message"), _TABLE_PROBLEMS)
def test_csv_and_tsv_problems_are_found_by_check(tmp_path, name, text, column, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        FileStorage(str(path), image_column=column).step().check()
    assert str(err.value) == message.format(p=path)


def test_a_csv_that_is_not_utf8_is_named_by_line_and_offset(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"id,image\n1,caf\xe9.png\n")
    with pytest.raises(ConfigError,
                       match=rf"^{path}:2: not valid UTF-8 \(byte 0xe9 at offset 14\)"):
        _check(path)


def test_image_column_is_for_csv_and_tsv_inputs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1"}\n')
    with pytest.raises(ConfigError, match=r"^storage.image_column=photo names a column of a"
                                          r" \.csv or \.tsv input, not of .*d.jsonl; for rows"
                                          r" of JSON, set"
                                          r" pipeline.steps.caption.input_image_key=photo$"):
        FileStorage(str(path), image_column="photo").step().check()


@pytest.mark.parametrize("name", ["d.parquet", "d.xlsx", "d.txt", "d"])
def test_inputs_in_unknown_formats_are_refused(tmp_path, name):
    (tmp_path / name).write_text("id,image\n1,a.png\n")
    with pytest.raises(ConfigError, match=f"^cannot read input {tmp_path}/{name}: .*; capflow"
                                          " reads .json, .jsonl, .csv and .tsv files and folders"
                                          " of images"):
        _check(tmp_path / name)


@pytest.mark.parametrize("name", ["o.parquet", "o.xlsx", "o.txt", "o"])
def test_outputs_in_unknown_formats_are_refused_when_the_step_is_made(tmp_path, name):
    with pytest.raises(ConfigError, match=f"^cannot write output {tmp_path}/{name}: .*; capflow"
                                          " writes .json, .jsonl, .csv and .tsv files"):
        FileStorage(str(tmp_path / "d.csv")).step(output=str(tmp_path / name))


def test_check_of_a_folder_or_a_table_creates_nothing_and_counts_rows(tmp_path):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / "sub" / "a.png").write_bytes(b"")
    (tmp_path / "d.tsv").write_text("id\tfile\n1\ta.png\n\n2\tb.png\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for data, rows in [(tmp_path / "photos", 1), (tmp_path / "d.tsv", 2)]:
        storage = FileStorage(str(data), cache_path=str(tmp_path / "cache")).step(
            output=str(tmp_path / "new" / "out.csv"))
        storage.check()
        assert storage.count(cheap_only=True) == rows
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before



# --- the real command ---------------------------------------------------------------------------


def _make_invalid(tmp_path, name: str):
    data, _ = make_dataset(tmp_path, 3, name=name)
    raw = data.read_bytes().replace(b'"0001"', b'"00\xff1"')
    data.write_bytes(raw)
    line, offset = _where_invalid(raw)
    return data, (f"{data}:{line}: not valid UTF-8 (byte 0xff at offset {offset});"
                  " save the file as UTF-8")


def _case(tmp_path, case: str) -> tuple[list[str], str]:
    """The arguments of a bad command and the one line it must print."""
    if case in ("invalid_json", "invalid_jsonl"):
        data, message = _make_invalid(tmp_path, "data.json" if case == "invalid_json" else
                                      "data.jsonl")
        return [f"input={data}", f"output={tmp_path}/out.jsonl"], message
    data, _ = make_dataset(tmp_path, 3)
    if case == "missing_input":
        return ([f"input={tmp_path}/missing.jsonl", f"output={tmp_path}/out.jsonl"],
                f"input file not found: {tmp_path}/missing.jsonl")
    if case == "output_folder":
        (tmp_path / "out.jsonl").mkdir()
        return ([f"input={data}", f"output={tmp_path}/out.jsonl"],
                f"output is a folder: {tmp_path}/out.jsonl; name a file such as"
                f" {tmp_path}/out.jsonl/captions.jsonl")
    if case == "output_folder_no_suffix":
        return ([f"input={data}", f"output={tmp_path}/images"],
                f"output is a folder: {tmp_path}/images; name a file such as"
                f" {tmp_path}/images/captions.jsonl")
    assert case == "output_under_a_file"
    return ([f"input={data}", f"output={tmp_path}/data.json/out.jsonl"],
            f"cannot write the output {tmp_path}/data.json/out.jsonl: {tmp_path}/data.json is a"
            " file, not a folder")


@pytest.mark.parametrize("case", ["invalid_json", "invalid_jsonl", "missing_input",
                                  "output_folder", "output_folder_no_suffix",
                                  "output_under_a_file"])
def test_the_command_stops_with_one_line_and_sends_nothing(tmp_path, server, case):
    args, message = _case(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_capflow(*args, f"api_url={server.base_url}", "model_name=m",
                         "hydra.run.dir=.", "hydra.output_subdir=null", cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"capflow: error: {message}\n"
    assert "Traceback" not in result.stdout
    assert server.stats()["requests_total"] == 0 and server.requests == []
    # Nothing was created either: no journal, no lock, no output, no cache.
    after = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log"))
    assert after == before


def test_a_good_command_still_runs(tmp_path, server):
    data, rows = make_dataset(tmp_path, 2, name="data.jsonl")
    result = run_capflow(f"input={data}", f"output={tmp_path}/out.jsonl",
                         f"api_url={server.base_url}", "model_name=m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.stats()["requests_total"] == len(rows)
