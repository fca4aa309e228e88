"""One capflow run per output: an exclusive ``flock`` on a file beside the run journal.

Two runs writing one output would interleave their journal rows and then replace each other's
output, so the second run must stop before it sends anything. ``flock`` is used because the
kernel drops it when its holder dies, however it dies: ``kill -9``, a crash or a power cut can
never leave a stale lock behind. The holder writes who it is (pid, host, start time, command
line) into the lock file, so that the run it refuses can say which process to wait for.

The lock file is removed when the run ends, so that finished outputs are not littered with
empty files. Removing a file that others may lock is racy: a run that opened the file just
before it was removed could lock the removed inode while a third run creates and locks a new
file at the same path, and both would think they are alone. Hence the holder removes the file
while it still holds the lock, and every run, once it has the lock, checks that the path still
names the inode it locked, and starts again when it does not.

Where ``fcntl`` does not exist (Windows), runs go without the lock, which is said once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from capflow.errors import ConfigError
from capflow.redaction import printable

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_JOURNAL_SUFFIX = ".journal.sqlite"
_INFO_WAIT = 0.5  # seconds to wait for a holder that has just locked to say who it is
_COMMAND_LIMIT = 200  # characters of the holder's command line shown in the error
_URL_USERINFO = re.compile(r"(://)[^/@\s]+@")  # http://user:password@host: keep the password out
_warned_no_flock = False


def lock_path_for(journal: Path) -> Path:
    """The lock file of the run journal ``journal``."""
    return journal.with_name(journal.name + LOCK_SUFFIX)


def _output_name(journal: Path) -> str:
    """The output a journal belongs to (``out.jsonl`` for ``out.jsonl.journal.sqlite``)."""
    text = str(journal)
    return text[: -len(_JOURNAL_SUFFIX)] if text.endswith(_JOURNAL_SUFFIX) else text


class RunLock:
    """An exclusive, non-blocking lock on ``<journal>.lock``, held from ``acquire()`` to
    ``release()`` (or until the process ends).

    :param journal: the run journal this lock guards; the lock file sits beside it.
    :param output: the output named in the error message (default: derived from ``journal``).
    """

    def __init__(self, journal: Path, output: str | None = None) -> None:
        self.path = lock_path_for(Path(journal))
        self.output = output or _output_name(Path(journal))
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock at once or raise ``ConfigError`` naming the run that holds it."""
        if self._fd is not None:
            return self
        if fcntl is None:
            _warn_no_flock()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise ConfigError(
                        f"cannot lock {self.path}: {exc.strerror}"
                        " (capflow locks it so that two runs never write one output)"
                    ) from None
                holder = _read_holder(fd)
                os.close(fd)
                raise ConfigError(self._busy_message(holder)) from None
            if _same_file(fd, self.path):
                break
            # The last holder removed the file between our open and our flock: the inode we
            # locked is no longer the lock. Lock the file now at the path instead.
            os.close(fd)
        try:
            _write_holder(fd)
        except OSError:
            # Who holds the lock is only for the message of a run it refuses; the lock holds.
            log.debug("could not record the lock holder in %s", self.path, exc_info=True)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Removed while still locked: see the module docstring.
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):
                os.unlink(self.path)
        os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self) -> None:
        # A safety net, not the way to release: an owner that failed before close() (a full
        # disk at the end of a run, in a long-lived Python program) must not keep the output
        # locked for the rest of the process once the lock is gone.
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _open(self) -> int:
        try:
            # Not inherited by child processes (os.open's default): a child outliving us must
            # not keep the lock.
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the lock file {self.path}: {exc.strerror}"
                " (capflow locks it so that two runs never write one output)"
            ) from None

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        who = "another capflow run"
        details = []
        if holder:
            pid, host = holder.get("pid"), holder.get("host")
            if pid == os.getpid() and host == socket.gethostname():
                who = "another run in this same process"
            details.append(f"pid {pid}" + (f" on {host}" if host else ""))
            started = holder.get("started")
            if isinstance(started, (int, float)):
                details.append(f"started {_when(started)}")
            command = holder.get("command")
            if command:
                details.append(f"command: {printable(str(command), _COMMAND_LIMIT)}")
        else:
            details.append("pid unknown")
        return (f"{self.output} is being written by {who} ({', '.join(details)}):"
                " wait for it to end or stop it")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _command_line() -> str:
    args = list(sys.argv)
    if args:
        args[0] = os.path.basename(args[0]) or args[0]
    return _URL_USERINFO.sub(r"\1[redacted]@", " ".join(args))


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": _command_line()}
    data = json.dumps(info).encode()
    # Truncated first: a run reading meanwhile sees nothing (and waits a little), never the
    # stale record of a killed holder with a fresh one half written over it.
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder's record; a holder that has only just locked may not have written it yet."""
    deadline = time.monotonic() + _INFO_WAIT
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) or time.monotonic() >= deadline:
            return info if isinstance(info, dict) else None
        time.sleep(0.01)


def _when(started: float) -> str:
    then = time.localtime(started)
    if time.strftime("%Y-%m-%d", then) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", then)
    return time.strftime("%Y-%m-%d %H:%M:%S", then)


def _warn_no_flock() -> None:
    global _warned_no_flock
    if not _warned_no_flock:
        _warned_no_flock = True
        log.warning("file locks are not available on this platform: capflow cannot tell when"
                    " two runs write one output, so make sure only one does")
