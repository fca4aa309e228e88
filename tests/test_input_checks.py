"""Bad inputs and outputs are one-line errors found before anything is created or sent:
FileStorage.check(), and the real command on a missing, non-UTF-8 or misplaced file."""

from __future__ import annotations

import io
import os
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
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ConfigError, match=f"^input is a folder, not a file: {tmp_path}/folder"):
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
