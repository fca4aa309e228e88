"""FileStorage: rows from a JSON array (the seed's format), JSON Lines, CSV or TSV file or a
folder of images; finished rows written as JSON, JSON Lines, CSV or TSV.

The formats follow the input's extension (or its being a folder) and the output's: a name
capflow cannot read or write is a one-line ConfigError before anything is read or sent. The
output is replaced atomically (``capflow.storage.atomic``): a reader, a crash or a full disk sees
the old output or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from capflow.errors import CapflowError, ConfigError
from capflow.rows import Row
from capflow.storage.atomic import write_atomically
from capflow.storage.base import Storage
from capflow.storage.csv_output import write_table
from capflow.storage.folder import FolderScan, ImageFolder
from capflow.storage.formats import FOLDER, TABULAR, input_format, output_format
from capflow.storage.json_stream import (
    check_first_json_line,
    check_utf8,
    count_json_lines,
    iter_json_array,
    iter_json_lines,
    scan_json_array,
    utf8_problem,
)
from capflow.storage.tabular import Table

__all__ = ["FileStorage", "check_output_path", "write_atomically"]

FORMATS = ("json", "jsonl")  # of step files
# Write errors that more room (or a bigger file size limit) fixes.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True)
class _Scan:
    """What ``check()`` learnt reading the whole input, so that ``count()`` and
    ``input_identity()`` need not read it again."""

    count: int
    folder: FolderScan | None = None


class FileStorage(Storage):
    """Rows in a file or a folder of images; each step writes ``<cache_path>/<prefix>_step<N>``.

    :param first_entry_file_name: the dataset: a ``.json`` array of rows, a ``.jsonl``, ``.csv``
        or ``.tsv`` file, or a folder of images (one row per image).
    :param cache_path: the folder for step files (created when needed).
    :param file_name_prefix: the step files' name prefix.
    :param cache_type: the step files' format, ``json`` or ``jsonl``.
    :param image_column: a CSV/TSV input's column of image references (None: the first of
        ``image``, ``image_path``, ``file``, ``filename``, ``path``, ``url`` it has).
    """

    # Rows are written as the text they were read from, with the new fields spliced in.
    rows_as = "json"

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        cache_type: str = "jsonl",
        image_column: str | None = None,
    ) -> None:
        if cache_type not in FORMATS:
            raise ConfigError(f"storage.cache_type must be one of {FORMATS}, not {cache_type!r}")
        if not first_entry_file_name:
            raise ConfigError("storage.first_entry_file_name (input=...) is not set")
        self.first_entry_file_name = str(first_entry_file_name)
        self.cache_path = str(cache_path)
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.image_column = str(image_column) if image_column not in (None, "") else None
        self._step = 0
        self._output: str | None = None
        self._scan: _Scan | None = None
        # Paths in rows are relative to the dataset file, or to the folder of images that is
        # the dataset, whichever step reads them.
        first = Path(self.first_entry_file_name).resolve()
        self._base_dir = first if first.is_dir() else first.parent

    def _step_file(self, step: int) -> str:
        if step == 0:
            return self.first_entry_file_name
        name = f"{self.file_name_prefix}_step{step}.{self.cache_type}"
        return os.path.join(self.cache_path, name)

    def step(self, output: str | None = None) -> FileStorage:
        view = FileStorage.__new__(FileStorage)
        view.__dict__.update(self.__dict__)
        self._step += 1
        view._step = self._step
        view._scan = None
        if output:
            if os.path.isdir(output):
                raise ConfigError(_folder_output(str(output)))
            output_format(str(output))  # one that capflow cannot write is refused here
        view._output = str(output) if output else None
        return view

    @property
    def input_path(self) -> str:
        """The file (or folder) this step reads."""
        return self._step_file(max(self._step - 1, 0))

    @property
    def output_path(self) -> str:
        """The file this step writes."""
        return self._output or self._step_file(max(self._step, 1))

    @property
    def reads_earlier_step(self) -> bool:
        return self._step > 1

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def input_name(self) -> str:
        return self.input_path

    @property
    def output_name(self) -> str:
        return self.output_path

    def _input_format(self) -> str:
        """json, jsonl, csv, tsv or folder (step files are the ``cache_type``)."""
        if self._step <= 1:
            return input_format(self.input_path)
        return self.cache_type

    def input_identity(self) -> str:
        path = Path(self.input_path)
        if self._input_format() == FOLDER:
            # The set of images, not the folder's times: those change with any file in it.
            found = self._scan.folder if self._scan and self._scan.folder else None
            found = found or ImageFolder(str(path)).scan()
            return f"folder:{path.resolve()}:{found.count}:{found.digest}"
        try:
            st = path.stat()
        except OSError:
            return str(path.resolve())
        if self._step > 1:
            # An earlier step's file is written whole by every run of that step, also when its
            # rows are all as they were: what it holds, not when it was written, says whether
            # this step's finished rows still hold.
            return f"{path.resolve()}:{st.st_size}:{_digest(path)}"
        identity = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if self._input_format() in TABULAR and self.image_column:
            identity += f":image_column={self.image_column}"  # other images, other rows
        return identity

    def journal_path(self) -> Path:
        out = Path(self.output_path)
        return out.with_name(out.name + ".journal.sqlite")

    def check(self) -> None:
        """The input can be read whole and has rows in a format capflow reads; the output can
        be written.

        Runs once per step, before anything is created or sent, and creates nothing. It reads
        the input once: a ``.json`` array, a CSV or TSV file or a folder is read whole (UTF-8
        and syntax in one pass: about 0.3 s for 100,000 JSON rows), which also counts the
        rows; a ``.jsonl`` file gets a byte scan for UTF-8 (5 to 25 ms for 30 MB) and its
        first row parsed, since later bad lines are only those rows' errors.
        """
        self._scan = None
        self._check_input()
        self._check_output()

    def _check_input(self) -> None:
        path = self.input_path
        try:
            # stat before open: opening a FIFO would wait for a writer.
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise ConfigError(f"input file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read input file {path}: {exc.strerror}") from None
        fmt = self._input_format()
        if fmt == FOLDER:
            found = ImageFolder(path).scan()
            self._scan = _Scan(found.count, found)
            return
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"input is a folder, not a file: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"input is not a regular file: {path}")
        self._check_image_column(fmt)
        with _reading(path):
            if fmt == "json":
                self._scan = _Scan(scan_json_array(path))
            elif fmt in TABULAR:
                self._scan = _Scan(self._table(fmt).scan())
            else:
                with open(path, "rb") as f:
                    check_utf8(f, path)
                check_first_json_line(path)

    def _check_image_column(self, fmt: str) -> None:
        if self.image_column and self._step <= 1 and fmt not in TABULAR:
            raise ConfigError(
                f"storage.image_column={self.image_column} names a column of a .csv or .tsv"
                f" input, not of {self.input_path}; for rows of JSON, set"
                f" pipeline.steps.caption.input_image_key={self.image_column}"
            )

    def _check_output(self) -> None:
        check_output_path(self.output_path)

    def _table(self, fmt: str) -> Table:
        return Table(self.input_path, "\t" if fmt == "tsv" else ",", self.image_column)

    def count(self, cheap_only: bool = False) -> int | None:
        if self._scan is not None:
            return self._scan.count
        path = self.input_path
        fmt = self._input_format()
        if fmt == "jsonl":
            return count_json_lines(path) if os.path.exists(path) else None
        if cheap_only:
            return None
        with _reading(path):
            if fmt == FOLDER:
                return ImageFolder(path).scan().count
            if fmt in TABULAR:
                return self._table(fmt).scan()
            return scan_json_array(path)

    def read(self) -> Iterator[Row]:
        path = self.input_path
        fmt = self._input_format()
        # check() finds the problems first; here only without it (the Python API, or a file
        # changed since): still one line naming the place, not a decoder traceback.
        with _reading(path):
            if fmt == FOLDER:
                yield from ImageFolder(path).rows()
            elif fmt in TABULAR:
                yield from self._table(fmt).rows()
            else:
                # utf-8-sig: a byte order mark (some Windows editors write one) is not a row's.
                with open(path, encoding="utf-8-sig") as f:
                    yield from _json_rows(f, path, fmt)

    def write(self, lines: Iterable[str]) -> None:
        """Replace the output atomically with ``lines``; on any failure the old output stays.

        A CSV or TSV output reads ``lines`` twice when it can be (a list, a view that can be
        read again); a one-pass iterator is copied to a nameless temporary file first.

        :raises capflow.errors.CapflowError: the output cannot be written (a full disk, a
            file size limit, permissions); the message says where the finished rows are kept.
        """
        path = Path(self.output_path)
        fmt = output_format(str(path)) if self._output else self.cache_type
        try:
            if fmt in TABULAR:
                write_table(path, lines, "\t" if fmt == "tsv" else ",")
            else:
                write_atomically(path, lines, as_array=fmt == "json")
        except OSError as exc:
            raise CapflowError(self._write_problem(path, exc)) from None

    def _write_problem(self, path: Path, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        if exc.errno in _NO_SPACE:
            fix = "free some space and run the same command again"
        else:
            fix = "fix that and run the same command again"
        return (f"cannot write {path}: {reason}; the finished rows are kept in the journal"
                f" {self.journal_path()}, {fix}")


def _digest(path: Path) -> str:
    """A digest of the file's bytes (BLAKE2b: about a second per GB on one core)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return "unreadable"
    return digest.hexdigest()


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Errors reading the input as one-line ``ConfigError``s."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"input file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(utf8_problem(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read input file {path}: {exc.strerror or exc}") from None


def _json_rows(f: IO[str], path: str, fmt: str) -> Iterator[Row]:
    if fmt == "json":
        for index, (value, raw) in enumerate(iter_json_array(f, path)):
            yield _row(index, value, raw, f"{path}: row {index + 1}")
    else:
        for index, (number, raw) in enumerate(iter_json_lines(f)):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                value = _BadRow(f"{path}:{number}: not valid JSON ({exc.msg})")
            yield _row(index, value, raw, f"{path}:{number}")


def check_output_path(out: str, name: str = "output") -> None:
    """Raise ``ConfigError`` (one line, naming ``name``) unless a file can be written at
    ``out``: not a folder, not a device, in a folder that exists or can be made, writable."""
    try:
        st = os.stat(out)
    except OSError:
        st = None  # not there yet (or its folder is not): see below
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ConfigError(_folder_output(out, name))
    if st is not None and not stat.S_ISREG(st.st_mode):
        # e.g. /dev/null: the output is replaced by a rename, which would replace the device.
        raise ConfigError(f"{name} is not a regular file: {out}")
    folder = Path(out).parent
    # The nearest folder that exists: the output's own, or the one its folder is made in.
    for existing in (folder, *folder.parents):
        try:
            st = os.stat(existing)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ConfigError(f"cannot write the {name} {out}: {existing}: {exc.strerror}"
                              ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"cannot write the {name} {out}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write the {name} {out}: the folder {existing} is not"
                              " writable")
        return


def _folder_output(out: str, name: str = "output") -> str:
    example = os.path.join(out, "captions.jsonl")
    return f"{name} is a folder: {out}; name a file such as {example}"


class _BadRow(str):
    """Marks a row whose text could not be parsed; the string is the error message."""


def _row(index: int, value: object, raw: str, where: str) -> Row:
    if isinstance(value, dict):
        return Row(index, value, raw)
    message = str(value) if isinstance(value, _BadRow) else f"{where}: a row must be a JSON object"
    # Keep the unparseable text so the output still accounts for this row.
    return Row(index, {"_raw": raw}, None, error=message)
