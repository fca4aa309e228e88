"""FileStorage: JSON (an array of rows, the seed's format) and JSON Lines files.

The output is replaced atomically: rows go to a temporary file of a unique name in the
output's folder, which is flushed to disk and then renamed over the output, so a reader (or a
crash, or a full disk) sees the old output or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from capflow.errors import CapflowError, ConfigError
from capflow.rows import Row
from capflow.storage.base import Storage
from capflow.storage.json_stream import (
    check_utf8,
    count_json_lines,
    iter_json_array,
    iter_json_lines,
)

FORMATS = ("json", "jsonl")
# Write errors that more room (or a bigger file size limit) fixes.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _format_of(path: str, default: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else default


class FileStorage(Storage):
    """Rows in a JSON or JSON Lines file; each step writes ``<cache_path>/<prefix>_step<N>``.

    :param first_entry_file_name: the dataset: a ``.json`` array of rows or a ``.jsonl`` file.
    :param cache_path: the folder for step files (created when needed).
    :param file_name_prefix: the step files' name prefix.
    :param cache_type: the step files' format, ``json`` or ``jsonl``.
    """

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        cache_type: str = "jsonl",
    ) -> None:
        if cache_type not in FORMATS:
            raise ConfigError(f"storage.cache_type must be one of {FORMATS}, not {cache_type!r}")
        if not first_entry_file_name:
            raise ConfigError("storage.first_entry_file_name (input=...) is not set")
        self.first_entry_file_name = str(first_entry_file_name)
        self.cache_path = str(cache_path)
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self._step = 0
        self._output: str | None = None
        # Paths in rows are relative to the dataset file, whichever step reads them.
        self._base_dir = Path(self.first_entry_file_name).resolve().parent

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
        if output and Path(str(output)).suffix.lower() not in (".json", ".jsonl"):
            if os.path.isdir(output):
                raise ConfigError(_folder_output(str(output)))
            raise ConfigError(f"output must end in .json or .jsonl: {output}")
        view._output = str(output) if output else None
        return view

    @property
    def input_path(self) -> str:
        """The file this step reads."""
        return self._step_file(max(self._step - 1, 0))

    @property
    def output_path(self) -> str:
        """The file this step writes."""
        return self._output or self._step_file(max(self._step, 1))

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def input_name(self) -> str:
        return self.input_path

    @property
    def output_name(self) -> str:
        return self.output_path

    def input_identity(self) -> str:
        path = Path(self.input_path)
        try:
            st = path.stat()
        except OSError:
            return str(path.resolve())
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def journal_path(self) -> Path:
        out = Path(self.output_path)
        return out.with_name(out.name + ".journal.sqlite")

    def check(self) -> None:
        """The input is a readable regular file of UTF-8 text; the output can be written.

        Runs once per step, before anything is created or sent; reads the input once (a
        streamed byte scan, 5 to 25 ms for 30 MB) and creates nothing.
        """
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
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"input is a folder, not a file: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"input is not a regular file: {path}")
        try:
            with open(path, "rb") as f:
                check_utf8(f, path)
        except OSError as exc:
            raise ConfigError(f"cannot read input file {path}: {exc.strerror}") from None

    def _check_output(self) -> None:
        check_output_path(self.output_path)

    def _open_input(self):  # noqa: ANN202 - a text file object
        path = self.input_path
        try:
            # utf-8-sig: a byte order mark (some Windows editors write one) is not part of a row.
            return open(path, encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(f"input file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read input file {path}: {exc.strerror}") from None

    def count(self, cheap_only: bool = False) -> int | None:
        path = self.input_path
        if _format_of(path, "jsonl") == "jsonl":
            return count_json_lines(path) if os.path.exists(path) else None
        if cheap_only:
            return None
        with self._open_input() as f:
            try:
                return sum(1 for _ in iter_json_array(f, path))
            except UnicodeDecodeError:
                raise ConfigError(_utf8_problem(path)) from None

    def read(self) -> Iterator[Row]:
        path = self.input_path
        with self._open_input() as f:
            try:
                yield from self._rows(f, path)
            except UnicodeDecodeError:
                # check() finds this first; here only without it (the Python API, or a file
                # changed since): still one line naming the place, not a decoder traceback.
                raise ConfigError(_utf8_problem(path)) from None

    def _rows(self, f: Iterable[str], path: str) -> Iterator[Row]:
        if _format_of(path, "jsonl") == "json":
            for index, (value, raw) in enumerate(iter_json_array(f, path)):
                yield _row(index, value, raw, f"{path}: row {index + 1}")
        else:
            for index, (number, raw) in enumerate(iter_json_lines(f)):
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as exc:
                    value = _BadRow(f"{path}:{number}: not valid JSON ({exc.msg})")
                yield _row(index, value, raw, f"{path}:{number}")

    def write(self, lines: Iterable[str]) -> None:
        """Replace the output atomically with ``lines``; on any failure the old output stays.

        :raises capflow.errors.CapflowError: the output cannot be written (a full disk, a
            file size limit, permissions); the message says where the finished rows are kept.
        """
        path = Path(self.output_path)
        try:
            write_atomically(path, lines, as_array=_format_of(str(path), self.cache_type) == "json")
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


def write_atomically(path: Path, lines: Iterable[str], *, as_array: bool = False) -> None:
    """Replace ``path`` with ``lines``, one per line (or, with ``as_array``, as the elements of
    a JSON array), so that it is the old file or the whole new one, never a mix.

    The lines go to a temporary file of a unique name in ``path``'s folder, which is flushed to
    disk, given the mode the old file had (or the one a new file gets), renamed over ``path``,
    and the folder is flushed too. On any failure the temporary file is removed and the error
    (an ``OSError`` for a full disk, say) raised; ``path`` is as it was.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name: two writers (two processes, two threads) never share a temp file.
        # Hidden, so a glob for outputs does not pick up a half-written one; the name is cut
        # so that a long output name does not make it too long.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        with open(fd, "w", encoding="utf-8") as f:
            _set_mode(fd, tmp, _new_file_mode(path))
            if as_array:
                f.write("[")
                for n, line in enumerate(lines):
                    f.write(",\n  " if n else "\n  ")
                    f.write(line)
                f.write("\n]\n")
            else:
                for line in lines:
                    f.write(line)
                    f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)  # makes the rename itself durable
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


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


def _utf8_problem(path: str) -> str:
    """The one-line message for ``path`` not being UTF-8, with the place when it is found."""
    try:
        with open(path, "rb") as f:
            check_utf8(f, path)
    except ConfigError as exc:
        return str(exc)
    except OSError:
        pass
    return f"{path}: not valid UTF-8; save the file as UTF-8"


def _current_umask() -> int:
    # Linux says it in /proc without changing it; os.umask() can only be read by setting it,
    # which for a moment would give files other threads create meanwhile the wrong mode.
    with (contextlib.suppress(OSError, ValueError, IndexError),
          open("/proc/self/status", encoding="ascii", errors="replace") as f):
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The mode a replaced output should have: the old output's, else what ``open()`` would
    give a new file (0666 less the umask), not mkstemp's private 0600."""
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    return 0o666 & ~_current_umask()


def _set_mode(fd: int, path: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows
        os.chmod(path, mode)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a platform whose folders cannot be opened (Windows) cannot sync them either
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems cannot sync a folder; the output is in place by now all the same.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", 0)):
            raise
    finally:
        os.close(fd)


class _BadRow(str):
    """Marks a row whose text could not be parsed; the string is the error message."""


def _row(index: int, value: object, raw: str, where: str) -> Row:
    if isinstance(value, dict):
        return Row(index, value, raw)
    message = str(value) if isinstance(value, _BadRow) else f"{where}: a row must be a JSON object"
    # Keep the unparseable text so the output still accounts for this row.
    return Row(index, {"_raw": raw}, None, error=message)
