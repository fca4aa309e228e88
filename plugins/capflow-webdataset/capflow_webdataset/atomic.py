"""Replacing one output file atomically, for outputs made of several files.

capflow replaces a storage's single output atomically itself; a sharded output is several
files, each replaced here the same way: written under a hidden temporary name in the same
folder, flushed to disk, then renamed over the old file. A reader, a crash or a full disk
sees each shard old or whole, never half-written.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with what ``write`` writes into the binary file it is given.

    The temporary file is opened with ``open``'s usual mode (0666 less the umask); on any
    failure it is removed and the error raised, and ``path`` is as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:200]}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
