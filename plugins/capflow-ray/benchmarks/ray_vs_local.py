"""executor=ray against the local engine: 12 MP photos captioned three ways, time and CPU.

What runs: ``--rows`` rows (2,000 by default), each naming one of ``--photos`` synthetic
4000x3000 JPEG photos (100 by default, used in turn; made once by the core benchmarks'
generator, ``benchmarks/prepare.py``, and kept in its cache folder), are captioned by the real
``capflow`` command against capflow's loopback fake server (``FakeOpenAIServer``, in this
process, ``--latency`` 0.05 s per reply) three times:

- ``local``: the local engine (``executor=local``, the default);
- ``ray-1``: ``executor=ray executor.num_workers=1``;
- ``ray-2``: ``executor=ray executor.num_workers=2``.

Every run has the same overrides otherwise: ``max_workers=32 progress=false image.cache=false``
(each row decodes and prepares its photo), the prompt ``Describe image {id}.`` (each row its
own request) and a response cache of its own (no run is answered from another's answers).

What is measured, for each run:

- **wall**: from the spawn of ``capflow`` to its exit (Ray's start and stop included);
- **machine CPU**: all cores' busy time over the run, from ``/proc/stat``. Ray's workers are
  not children of this process, so only the whole machine sees all of their CPU;
- **client CPU**: machine CPU less this process's own (the fake server and the sampler): what
  capflow, Ray and any other process on the machine used. ``ms/row`` is per row;
- **sampled CPU**: the CPU time of capflow's own processes (its session and descendants), read
  from ``/proc/<pid>/stat`` every 0.25 s: a lower bound that other users of the machine do not
  inflate (a process's last moments before it ends are missed);
- **other processes**: the CPU the machine's other processes were seen to spend meanwhile
  (sampled likewise), in cores: how busy the rest of the machine was, i.e. how far the wall,
  machine and client figures are to be trusted;
- for Ray, **extra CPU ms/row** (client and sampled) and **extra wall ms/row** over the local
  run (of the same round, with ``--repeat``);
- the busiest processes of the run, Ray's warnings and errors on stderr, and the server's
  requests, statuses and most requests in flight.

Each output is checked: every row present once, in input order, with a caption and no error,
rows of one photo captioned alike, Ray's rows identical to the local run's; the server must have
answered exactly one request per row. After each run, processes of the run still alive (Ray's
included) are reported as leftovers, and ended.

Run it where capflow and capflow-ray are installed (numpy too, for the photos)::

    python plugins/capflow-ray/benchmarks/ray_vs_local.py --rows 200   # a quick check
    python plugins/capflow-ray/benchmarks/ray_vs_local.py              # 2,000 rows, ~3 min

(The first run also makes the photos: a few minutes on two cores.) On a machine others are
using too, ``--repeat 2`` runs the three configurations twice in turn, each Ray run compared
with the local run of its round. ``--configs local,ray-2`` picks configurations. ``--keep``
keeps the work folder (outputs, each run's stdout and stderr); it is kept anyway when a check
fails. The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from capflow.testing.pytest_plugin import capflow_command
from capflow.testing.server import DEFAULT_MODEL, FakeOpenAIServer

REPO = Path(__file__).resolve().parents[3]
CONFIGS: dict[str, list[str]] = {
    "local": [],
    "ray-1": ["executor=ray", "executor.num_workers=1"],
    "ray-2": ["executor=ray", "executor.num_workers=2"],
}
CAPTION = re.compile(r"^\d+x\d+ #[0-9a-f]{6}$")
TICK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.25


# -- the photos and the dataset ------------------------------------------------------------


def photo_paths(cache_root: Path, count: int) -> list[Path]:
    """``count`` 4000x3000 photos from the core benchmarks' generator (made once, cached)."""
    prepare = _core_benchmark("prepare")
    data = prepare.photos(cache_root, count)
    return [(data.parent / row["image"][0]).resolve() for row in json.loads(data.read_text())]


def _core_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` from the repository's root (capflow's core benchmarks)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"benchmarks.{name}")


def write_dataset(path: Path, rows: int, photos: list[Path]) -> None:
    """JSON Lines: row ``i`` names photo ``i % len(photos)`` by its absolute path."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"{i:05d}", "image": str(photos[i % len(photos)])}) + "\n")


# -- CPU of the machine, of this process, of the client's processes ------------------------


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of all cores since boot (``/proc/stat``), as the core benchmarks read."""
    return float(_core_benchmark("harness").machine_cpu_seconds())


def own_cpu_seconds() -> float:
    """User and system CPU seconds of this process (the fake server's thread included)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children that have been waited for."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return kids.ru_utime + kids.ru_stime


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc/<pid>/stat`` says of one process."""

    pid: int
    ppid: int
    session: int
    start: int  # clock ticks after boot: (pid, start) names a process even if the pid is reused
    cpu: int  # user + system clock ticks
    name: str
    zombie: bool


def read_proc(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return ProcInfo(pid, int(rest[1]), int(rest[3]), int(rest[19]),
                    int(rest[11]) + int(rest[12]), name, rest[0] == "Z")


def process_name(info: ProcInfo) -> str:
    """A short name: Ray's own title (``ray::MapWorker``), a Python script's or module's name,
    else the program's."""
    args = _cmdline(info.pid).split()
    if not args:  # a zombie's, or one gone meanwhile
        return info.name.split("(")[0]
    if args[0].startswith("ray::"):
        return args[0].split("(")[0]
    if not Path(args[0]).name.startswith("python"):
        return Path(args[0]).name
    rest = iter(args[1:])
    for arg in rest:
        if arg == "-m":
            return next(rest, "python").rsplit(".", 1)[-1]
        if not arg.startswith("-"):
            return Path(arg).stem
    return "python"


def all_procs() -> dict[int, ProcInfo]:
    """Every process of the machine, by pid."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := read_proc(int(entry))) is not None:
            procs[info.pid] = info
    return procs


class ProcessSampler:
    """Follows a process, its session and all their descendants, in a thread: the last CPU
    time seen of each, and which of them are still alive once it stops. It also adds up what
    the machine's other processes (this one aside) are seen to spend meanwhile."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, int], ProcInfo] = {}
        self.names: dict[tuple[int, int], str] = {}
        self.others: dict[tuple[int, int], tuple[int, int]] = {}  # (cpu at first sight, last)
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> ProcessSampler:
        self.sample()
        self._first = False
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.sample()

    def sample(self) -> None:
        """Record the family as it is now, and the CPU of everything else."""
        procs = all_procs()
        family = self._family(procs)
        me = os.getpid()
        for info in procs.values():
            key = (info.pid, info.start)
            if info.pid in family:
                self.seen[key] = info
                if not info.zombie or key not in self.names:  # Ray retitles its workers
                    self.names[key] = process_name(info)
            elif info.pid != me:
                # A process born during the run counts from zero; one already there, from
                # what it had spent when first seen.
                base = self.others.get(key, (info.cpu if self._first else 0, 0))[0]
                self.others[key] = (base, info.cpu)

    def _family(self, procs: dict[int, ProcInfo]) -> set[int]:
        """The root, its session, the processes seen before and all their descendants."""
        family = {p.pid for p in procs.values()
                  if p.session == self.root or (p.pid, p.start) in self.seen}
        family.add(self.root)
        children: dict[int, list[int]] = {}
        for p in procs.values():
            children.setdefault(p.ppid, []).append(p.pid)
        todo = list(family)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in family:
                    family.add(child)
                    todo.append(child)
        return family

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds of the family, as last seen of each process."""
        return sum(p.cpu for p in self.seen.values()) / TICK

    @property
    def others_cpu_seconds(self) -> float:
        """CPU seconds the machine's other processes were seen to spend."""
        return sum(last - first for first, last in self.others.values()) / TICK

    def busiest(self, count: int = 6) -> list[tuple[str, float]]:
        """The ``count`` largest CPU users of the family (processes of one name added up),
        in CPU seconds."""
        by_name: dict[str, float] = {}
        for key, p in self.seen.items():
            name = self.names.get(key, p.name)
            by_name[name] = by_name.get(name, 0.0) + p.cpu / TICK
        return sorted(by_name.items(), key=lambda item: -item[1])[:count]

    def alive(self) -> list[ProcInfo]:
        """Processes of the family still running (zombies aside)."""
        out = []
        for (pid, start), _ in self.seen.items():
            now = read_proc(pid)
            if now is not None and now.start == start and not now.zombie:
                out.append(now)
        return out


# -- one measured run ----------------------------------------------------------------------


@dataclass
class Run:
    """One configuration's measured run."""

    name: str  # the configuration, with the round when there are several: "ray-1 #2"
    config: str  # a key of CONFIGS
    rows: int
    baseline: Run | None = field(default=None, repr=False)  # the local run of its round
    returncode: int = 0
    wall: float = 0.0
    machine_cpu: float = 0.0
    own_cpu: float = 0.0
    driver_cpu: float = 0.0
    sampled_cpu: float = 0.0
    others_cpu: float = 0.0
    processes: int = 0
    busiest: list[tuple[str, float]] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    max_in_flight: int = 0
    summary: str = ""
    stderr_tail: str = ""
    stderr_notes: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def client_cpu(self) -> float:
        """Machine CPU less this process's: capflow, Ray and anything else running."""
        return self.machine_cpu - self.own_cpu

    @property
    def others_cores(self) -> float:
        """Cores' worth of CPU the machine's other processes were seen to use."""
        return self.others_cpu / self.wall if self.wall else 0.0

    @property
    def unaccounted(self) -> float:
        """Machine CPU nobody was seen to spend: processes too short-lived to be sampled,
        the last moments of those that ended, interrupts."""
        return self.client_cpu - self.sampled_cpu - self.others_cpu

    def per_row_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.rows


def client_env() -> dict[str, str]:
    """This environment without API keys or a Ray cluster address (a local Ray is started),
    and with Ray's usage reporting off (the network is loopback only)."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and k != "RAY_ADDRESS"}
    return env | {"RAY_USAGE_STATS_ENABLED": "0"}


def capflow_args(data: Path, folder: Path, server: FakeOpenAIServer, photos_dir: Path,
                 max_workers: int, extra: list[str]) -> list[str]:
    """The capflow command of one configuration: its own output and response cache."""
    return [*capflow_command(), f"input={data}", f"output={folder / 'out.jsonl'}",
            f"api_url={server.base_url}", f"model_name={DEFAULT_MODEL}",
            f"max_workers={max_workers}", "progress=false", "image.cache=false",
            f"image.image_root={photos_dir}", f"cache.path={folder / 'cache/responses.sqlite'}",
            "prompt.user='Describe image {id}.'", *extra]


def measure(run: Run, argv: list[str], folder: Path, server: FakeOpenAIServer,
            timeout: float) -> None:
    """Run ``argv`` in ``folder`` to its end and fill in ``run``'s figures."""
    folder.mkdir(parents=True)
    server.reset()
    run.load_before = load_average()
    with open(folder / "stdout", "w+") as out, open(folder / "stderr", "w+") as err:
        machine, own, kids = machine_cpu_seconds(), own_cpu_seconds(), children_cpu_seconds()
        began = time.monotonic()
        proc = subprocess.Popen(argv, cwd=folder, env=client_env(), stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with ProcessSampler(proc.pid) as sampler:
            try:
                run.returncode = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                run.problems.append(f"still running after {timeout:.0f} s: killed")
                end_processes(sampler.alive())
                run.returncode = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM: the run and the Ray it started end too
                end_processes(sampler.alive())
                proc.wait()
                raise
            run.wall = time.monotonic() - began
            run.machine_cpu = machine_cpu_seconds() - machine
            run.own_cpu = own_cpu_seconds() - own
            run.driver_cpu = children_cpu_seconds() - kids
        run.load_after = load_average()
        run.sampled_cpu, run.processes = sampler.cpu_seconds, len(sampler.seen)
        run.others_cpu = sampler.others_cpu_seconds
        run.busiest = sampler.busiest()
        run.leftovers = leftovers(sampler)
        out.seek(0)
        err.seek(0)
        run.summary, stderr = out.read().strip(), err.read().strip()
    run.stderr_tail = "\n".join(stderr.splitlines()[-15:])
    run.stderr_notes = warnings_and_errors(stderr)
    stats = server.stats()
    run.requests, run.statuses = stats["requests_total"], stats["statuses"]
    run.max_in_flight = stats["max_in_flight"]


NOTE = re.compile(r"\bWARNING\b|\bERROR\b| E \d+ |Traceback|Error:")
STAMP = re.compile(r"^\[?\d{4}-\d\d-\d\d[ T][\d:,.]+\s*")
LEVEL = re.compile(r"^([EWI]) \d+ \d+\]\s*")  # Ray's C++ logs: "[time E pid tid] text"
LEVELS = {"E": "ERROR ", "W": "WARNING ", "I": "INFO "}


def warnings_and_errors(stderr: str, width: int = 160) -> list[str]:
    """The stderr lines that warn or report an error, once each, without their time stamps."""
    notes: list[str] = []
    for line in stderr.splitlines():
        if NOTE.search(line):
            text = STAMP.sub("", line.strip()).strip()
            text = LEVEL.sub(lambda m: LEVELS[m.group(1)], text)
            text = text if len(text) <= width else text[:width - 3] + "..."
            if text not in notes:
                notes.append(text)
    return notes


def leftovers(sampler: ProcessSampler, grace: float = 5.0) -> list[str]:
    """Processes of the run alive ``grace`` seconds after capflow exited, described; they
    are ended."""
    deadline = time.monotonic() + grace
    while (alive := sampler.alive()) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = [f"{p.pid} {p.name} ({_cmdline(p.pid)[:80]})" for p in alive]
    end_processes(alive)
    return described


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def end_processes(procs: list[ProcInfo]) -> None:
    """SIGKILL each of ``procs``, if it is still the process it was."""
    for p in procs:
        now = read_proc(p.pid)
        if now is not None and now.start == p.start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


# -- checks --------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    """The output's rows, or [] if it is missing."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_output(run: Run, out: list[dict], data: list[dict],
                 reference: list[dict] | None) -> None:
    """Every row once, in order, captioned, alike per photo; the same as the local run's; one
    request per row, all answered 200; the summary and exit status clean."""
    fail = run.problems.append
    if run.returncode != 0:
        fail(f"exit status {run.returncode}")
    if len(out) != len(data):
        fail(f"{len(out)} output rows, {len(data)} expected")
    if [r.get("id") for r in out] != [r["id"] for r in data[:len(out)]]:
        fail("output rows are not the input's, in order")
    bad = [r.get("id") for r in out
           if "_error" in r or not CAPTION.match(str(r.get("caption", "")))]
    if bad:
        fail(f"{len(bad)} rows without a caption (first: {bad[:3]})")
    by_photo: dict[str, set[str]] = {}
    for r in out:
        by_photo.setdefault(str(r.get("image")), set()).add(str(r.get("caption")))
    if any(len(c) > 1 for c in by_photo.values()):
        fail("rows of one photo captioned differently")
    if reference is not None and out != reference:
        fail("rows differ from the local run's")
    if run.requests != run.rows or run.statuses != {"200": run.rows}:
        fail(f"server: {run.requests} requests, statuses {run.statuses}; "
             f"{run.rows} answered 200 expected")
    rows = len(data)
    if f"{rows} of {rows}: {rows} done, 0 failed" not in run.summary:
        fail("capflow's summary does not say every row is done")


# -- report --------------------------------------------------------------------------------


def report_run(run: Run) -> None:
    """One run's figures, as soon as it ends."""
    local = run.baseline
    print(f"\n== {run.name}: {' '.join(CONFIGS[run.config]) or 'executor=local'}")
    print(f"   wall                 {run.wall:8.2f} s   ({run.rows / run.wall:.1f} rows/s)")
    print(f"   machine CPU          {run.machine_cpu:8.2f} s   (all cores, /proc/stat)")
    print(f"   this process's CPU   {run.own_cpu:8.2f} s   (fake server + sampler)")
    print(f"   client CPU           {run.client_cpu:8.2f} s   "
          f"({run.per_row_ms(run.client_cpu):.1f} ms/row; machine - this process)")
    print(f"   sampled CPU          {run.sampled_cpu:8.2f} s   "
          f"({run.per_row_ms(run.sampled_cpu):.1f} ms/row; processes of the run: {run.processes})")
    print("   busiest processes    " + ", ".join(f"{name} {cpu:.1f} s"
                                                 for name, cpu in run.busiest))
    print(f"   capflow's own rusage {run.driver_cpu:8.2f} s   (the driver and what it reaped)")
    print(f"   other processes      {run.others_cpu:8.2f} s   ({run.others_cores:.2f} cores; "
          f"the machine's other users, sampled)")
    print(f"   unaccounted          {run.unaccounted:8.2f} s   (client - sampled - other "
          f"processes: short-lived processes, interrupts)")
    print(f"   load average         {run.load_before}  ->  {run.load_after}")
    print(f"   server               {run.requests} requests, statuses {run.statuses}, "
          f"max {run.max_in_flight} in flight")
    if local is not None:
        print(f"   vs local             {extra_cpu_ms(run, local):+.1f} CPU ms/row (client), "
              f"{extra_sampled_ms(run, local):+.1f} (sampled), "
              f"{extra_wall_ms(run, local):+.1f} wall ms/row")
    for line in run.summary.splitlines():
        print(f"   | {line}")
    if run.leftovers:
        print(f"   LEFTOVERS ({len(run.leftovers)}, ended now):")
        for line in run.leftovers:
            print(f"     {line}")
    if run.stderr_notes:
        print("   stderr warnings and errors:")
        for line in run.stderr_notes:
            print(f"     {line}")
    print(f"   checks               {'; '.join(run.problems) or 'all rows captioned, OK'}")
    if run.problems and run.stderr_tail:
        print("   stderr (last lines):")
        for line in run.stderr_tail.splitlines():
            print(f"     {line}")
    sys.stdout.flush()


def extra_cpu_ms(run: Run, local: Run) -> float:
    return run.per_row_ms(run.client_cpu) - local.per_row_ms(local.client_cpu)


def extra_sampled_ms(run: Run, local: Run) -> float:
    return run.per_row_ms(run.sampled_cpu) - local.per_row_ms(local.sampled_cpu)


def extra_wall_ms(run: Run, local: Run) -> float:
    return run.per_row_ms(run.wall) - local.per_row_ms(local.wall)


def table(runs: list[Run]) -> str:
    """The compact table of every run."""
    head = ("config", "wall s", "rows/s", "machine CPU s", "client CPU s", "CPU ms/row",
            "sampled ms/row", "+CPU ms/row", "+sampled ms/row", "+wall ms/row", "others",
            "ok")
    lines: list[tuple[str, ...]] = [head]
    for r in runs:
        extra = (("-",) * 3 if r.baseline is None else
                 tuple(f"{fn(r, r.baseline):+.1f}"
                       for fn in (extra_cpu_ms, extra_sampled_ms, extra_wall_ms)))
        lines.append((
            r.name, f"{r.wall:.1f}", f"{r.rows / r.wall:.1f}", f"{r.machine_cpu:.1f}",
            f"{r.client_cpu:.1f}", f"{r.per_row_ms(r.client_cpu):.1f}",
            f"{r.per_row_ms(r.sampled_cpu):.1f}", *extra,
            f"{r.others_cores:.2f}", "yes" if not r.problems else "NO"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in lines)


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="rows captioned by each run")
    p.add_argument("--photos", type=int, default=100, help="distinct photos, used in turn")
    p.add_argument("--latency", type=float, default=0.05, help="the fake server's reply delay")
    p.add_argument("--max-workers", type=int, default=32, help="capflow's max_workers")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"runs, in order, from {', '.join(CONFIGS)}")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the configurations, one after the other (a busy machine)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    p.add_argument("--cache-dir", type=Path,
                   default=Path(tempfile.gettempdir()) / "capflow-bench-cache",
                   help="where the photos are kept (shared with the core benchmarks)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown or min(args.rows, args.photos, args.repeat) < 1:
        p.error(f"unknown configs {sorted(unknown)}" if unknown
                else "--rows, --photos and --repeat must be at least 1")
    return args


def header(args: argparse.Namespace, photos: list[Path]) -> None:
    import ray

    size = sum(p.stat().st_size for p in photos) / len(photos) / 1e6
    print(f"ray_vs_local: {args.rows} rows over {len(photos)} photos 4000x3000 JPEG "
          f"({size:.1f} MB each), latency {args.latency} s, max_workers={args.max_workers}, "
          f"image.cache=false; {os.cpu_count()} cores, Ray {ray.__version__}, "
          f"Python {sys.version.split()[0]}")
    print(f"load average at the start: {load_average()}", flush=True)


def run_all(args: argparse.Namespace, work: Path, photos: list[Path],
            on_run: Callable[[Run], None]) -> list[Run]:
    """Every configuration in turn, ``--repeat`` rounds of them, against one fake server."""
    data_path = work / "data.jsonl"
    write_dataset(data_path, args.rows, photos)
    data = read_rows(data_path)
    runs: list[Run] = []
    with FakeOpenAIServer(latency=args.latency) as server:
        for round_ in range(1, args.repeat + 1):
            local: Run | None = None
            reference: list[dict] | None = None
            for config in args.configs.split(","):
                name = config if args.repeat == 1 else f"{config} #{round_}"
                run = Run(name, config, args.rows, baseline=local)
                folder = work / name.replace(" #", "-")
                argv = capflow_args(data_path, folder, server, photos[0].parent,
                                    args.max_workers, CONFIGS[config])
                measure(run, argv, folder, server, args.timeout)
                out = read_rows(folder / "out.jsonl")
                check_output(run, out, data, reference)
                if config == "local":
                    local, reference = run, out
                runs.append(run)
                on_run(run)
    return runs


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: the run in progress is ended


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    photos = photo_paths(args.cache_dir, args.photos)
    for photo in photos:  # into the page cache, for every run alike
        photo.read_bytes()
    header(args, photos)
    work = Path(tempfile.mkdtemp(prefix="capflow-ray-vs-local-"))
    try:
        runs = run_all(args, work, photos, report_run)
    except BaseException:
        print(f"\nstopped; work folder kept: {work}", file=sys.stderr)
        raise
    print(f"\n{args.rows} rows, {len(photos)} photos. CPU ms/row: client CPU (machine - this "
          f"process) per row; sampled: capflow's processes only; +: over local; others: cores "
          f"used by other processes meanwhile\n")
    print(table(runs))
    failed = any(r.problems for r in runs)
    if args.keep or failed:
        print(f"\nwork folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
