"""Processes under measurement: the fake server, and a client run with its wall time and rusage.

The server always runs as its own process, so none of its CPU is charged to the client. A
client is started by a small launcher process, which forks it and times it from just before
the fork (``time.monotonic()``, the clock the server stamps requests with) to its reaping by
``os.wait4``, which also yields the client's own user and system CPU time and peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from capflow.testing.server import DEFAULT_MODEL

_ROWS = r"rows\s+\d+(?: of \d+)?: "  # "rows  N: ..." or "rows  N of TOTAL: ..."
_SUMMARY_PATTERNS = {
    "requests": r"requests\s+(\d+) sent",
    "retries": r"requests\s+\d+ sent, (\d+) retries",
    "done": _ROWS + r"(\d+) (?:done|ready)",
    "failed": _ROWS + r"\d+ (?:done|ready), (\d+) (?:failed|would fail)",
    "skipped": r"(\d+) skipped \(already done\)",
    "to_send": r"requests\s+(\d+) to send",
    "images": r"none sent; (\d+) images?,",
    "image_mb": r"images?, ([\d.]+) MB of image data",
    "elapsed": r"capflow (?:finished|stopped|dry run) in ([\d.]+) s",
}


def machine_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine since boot, all cores (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def capflow_executable() -> str:
    """The ``capflow`` console script of this interpreter (not a version-manager shim)."""
    beside = Path(sys.executable).with_name("capflow")
    return str(beside) if beside.exists() else shutil.which("capflow") or "capflow"


def capflow_command(**overrides: object) -> list[str]:
    """``capflow key=value ...``; ``model_name`` defaults to the fake server's model."""
    overrides = {"model_name": DEFAULT_MODEL, "progress": "false", **overrides}
    return [capflow_executable(), *(f"{k}={v}" for k, v in overrides.items())]


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a client: this one without API keys, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return env | (extra or {})


@dataclass
class RunResult:
    """One measured client process."""

    argv: list[str]
    started: float  # time.monotonic() just before the spawn
    wall: float  # seconds from spawn to exit
    returncode: int  # negative: killed by that signal
    cpu_user: float
    cpu_sys: float
    max_rss_mb: float
    stdout: str
    stderr: str
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        """User plus system CPU seconds of the client."""
        return self.cpu_user + self.cpu_sys

    def brief(self) -> str:
        """The tail of the client's output, for error messages."""
        text = (self.stderr.strip() + "\n" + self.stdout.strip()).strip()
        return text[-600:]


def parse_summary(text: str) -> dict[str, float]:
    """Figures of capflow's summary lines (requests sent, retries, rows done, ...)."""
    found = {}
    for key, pattern in _SUMMARY_PATTERNS.items():
        if m := re.search(pattern, text):
            found[key] = float(m.group(1))
    return found


# Clients are started by this small launcher, which forks them and reports their rusage. A
# process spawned straight from the benchmark (vfork, then exec) inherits the benchmark's own
# peak RSS as a floor on its ru_maxrss: after a scenario that verified 100,000 rows here,
# every later client would seem to use hundreds of MB.
_LAUNCHER = """
import json, os, sys, time
argv, report = json.loads(sys.argv[1]), int(sys.argv[2])
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.close(report)
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
os.write(report, (json.dumps({"pid": pid, "started": started}) + "\\n").encode())
_, status, usage = os.wait4(pid, 0)
os.write(report, (json.dumps({"ended": time.monotonic(),
                              "status": os.waitstatus_to_exitcode(status),
                              "user": usage.ru_utime, "sys": usage.ru_stime,
                              "maxrss": usage.ru_maxrss}) + "\\n").encode())
"""


def run_measured(
    argv: list[str], cwd: Path, *, label: str = "client",
    kill_after: float | Callable[[float], float] | None = None,
    timeout: float = 900.0, env: dict[str, str] | None = None,
) -> RunResult:
    """Run ``argv`` in ``cwd`` to its end, or SIGKILL it ``kill_after`` (else ``timeout``)
    seconds after the spawn. A callable ``kill_after`` is called with the spawn time once the
    child runs, and returns that delay. Output is kept in ``cwd/<label>.stdout``/``.stderr``."""
    cwd.mkdir(parents=True, exist_ok=True)
    out_path, err_path = cwd / f"{label}.stdout", cwd / f"{label}.stderr"
    read_end, write_end = os.pipe()
    with open(out_path, "w+b") as out, open(err_path, "w+b") as err, \
            os.fdopen(read_end, "rb") as reports:
        launcher = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, json.dumps(argv), str(write_end)],
            cwd=cwd, env=client_env(env), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            pass_fds=(write_end,))
        os.close(write_end)
        first = reports.readline()
        if not first:
            launcher.wait()
            raise RuntimeError(f"the client launcher failed: {_read(err)[-300:]}")
        spawn = json.loads(first)
        started = spawn["started"]
        pidfd = os.pidfd_open(spawn["pid"])
        try:
            if callable(kill_after):
                kill_after = kill_after(started)
            deadline = started + (kill_after if kill_after is not None else timeout)
            ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        except BaseException:
            ready = []  # never leave the child running
            raise
        finally:
            if not ready:  # pidfd: never signals a recycled pid
                with contextlib.suppress(ProcessLookupError):  # it ended just now
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            end = json.loads(reports.readline())
            launcher.wait()
            os.close(pidfd)
        stdout, stderr = _read(out), _read(err)
    returncode = end["status"]
    if kill_after is None and returncode == -signal.SIGKILL:
        stderr += f"\n(benchmark: killed after the {timeout:.0f} s timeout)"
    return RunResult(argv, started, end["ended"] - started, returncode, end["user"],
                     end["sys"], end["maxrss"] / 1024, stdout, stderr, parse_summary(stdout))


def _read(f: IO[bytes]) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


class Server:
    """``python -m capflow.testing.server`` in its own process, for a ``with`` block.

    :param latency: seconds before every reply.
    :param rpm_limit: answer 429 above this many requests a minute (per one-second window).
    :param faults: fault rates by kind, e.g. ``{"429": 0.1, "hang": 0.01}``.
    :param retry_after: ``Retry-After`` of injected 429s.
    :param hang_seconds: how long an injected hang stalls.
    :param slots: answer this many requests at once, each taking ``latency``; the rest queue.
    :param failure: ``(status, message)`` every request is answered with.
    :param log_dir: where the server's stderr goes.
    """

    def __init__(
        self, latency: float, *, rpm_limit: int | None = None,
        faults: dict[str, float] | None = None, retry_after: float = 1.0,
        hang_seconds: float = 30.0, seed: int = 0, slots: int | None = None,
        failure: tuple[int, str] | None = None, log_dir: Path,
    ) -> None:
        self.argv = [sys.executable, "-m", "capflow.testing.server", "--port", "0",
                     "--latency", str(latency), "--seed", str(seed)]
        if rpm_limit:
            self.argv += ["--rpm-limit", str(rpm_limit)]
        if slots:
            self.argv += ["--slots", str(slots)]
        if failure:
            self.argv += ["--fail-status", str(failure[0]), "--fail-message", failure[1]]
        for kind, rate in (faults or {}).items():
            self.argv += [f"--fault-{kind.replace('_', '-')}", str(rate)]
        if faults:
            self.argv += ["--retry-after", str(retry_after), "--hang-seconds", str(hang_seconds)]
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def __enter__(self) -> Server:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "server.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("LISTENING "):
            self.__exit__()
            raise RuntimeError(f"the fake server did not start: {line!r}")
        self.base_url = line.split()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def _get(self, path: str) -> Any:
        root = self.base_url.removesuffix("/v1")
        with urllib.request.urlopen(root + path, timeout=60) as response:
            return json.load(response)

    def fail(self, status: int | None, message: str = "server failure") -> None:
        """``POST /_failure``: answer every request with ``status`` from now on (None: stop)."""
        root = self.base_url.removesuffix("/v1")
        body = json.dumps({"status": status, "message": message} if status else {}).encode()
        request = urllib.request.Request(root + "/_failure", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60):
            pass

    def stats(self) -> dict[str, Any]:
        """``GET /_stats``: request totals, max in flight, statuses, faults injected."""
        return self._get("/_stats")

    def log(self) -> list[tuple[float, int]]:
        """``GET /_log``: (received_at, status) of every request, sorted by arrival."""
        return sorted((t, s) for t, s in self._get("/_log"))
