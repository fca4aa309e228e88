"""Replacing a file atomically: readers, crashes and full disks see the old file or the whole
new one, never a mix.

The new content goes to a temporary file of a unique name in the target's folder, which is
flushed to disk, given the mode the old file had (or the one a new file gets), renamed over the
target, and the folder is flushed too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO


def replace_atomically(
    path: Path, write_body: Callable[[TextIO], None], *, newline: str | None = None
) -> None:
    """Replace ``path`` with what ``write_body`` writes into the text file it is given.

    ``newline`` is passed to ``open`` (``""`` for the csv module, which ends its own lines).
    On any failure the temporary file is removed and the error (an ``OSError`` for a full
    disk, say) raised; ``path`` is as it was.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name: two writers (two processes, two threads) never share a temp file.
        # Hidden, so a glob for outputs does not pick up a half-written one; the name is cut
        # so that a long output name does not make it too long.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        with open(fd, "w", encoding="utf-8", newline=newline) as f:
            _set_mode(fd, tmp, _new_file_mode(path))
            write_body(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)  # makes the rename itself durable
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def replace_path_atomically(path: Path, write_to: Callable[[Path], None]) -> None:
    """Replace ``path`` with the file ``write_to`` writes at the temporary path it is given
    (for writers that open files themselves: Parquet, tar), atomically as above."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        _set_mode(fd, tmp, _new_file_mode(path))
        os.close(fd)
        write_to(Path(tmp))
        with open(tmp, "rb") as f:  # the writer may not have synced what it wrote
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_atomically(path: Path, lines: Iterable[str], *, as_array: bool = False) -> None:
    """Replace ``path`` with ``lines``, one per line (or, with ``as_array``, as the elements of
    a JSON array), so that it is the old file or the whole new one, never a mix."""

    def body(f: TextIO) -> None:
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

    replace_atomically(path, body)


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
