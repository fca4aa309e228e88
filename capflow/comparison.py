"""Outputs side by side: a sweep's jobs, or separate runs, compared by their figures and by the
answers each gave to the same sample of rows.

Each job is one output file. Its rows, done and failed rows and caption lengths are counted from
the file itself (read as a stream by ``capflow/show.py``); what it spent (tokens, cost, time)
comes from the run manifests of every step of the pipeline that built it. Each job is labelled
by what sets it apart: its swept values, else the config values that differ between the jobs,
else its path. ``Comparison.write`` puts four files in a folder: ``comparison.json`` (the
figures and the sample), ``comparison.md`` (the figures as a table), ``comparison.html`` (one
self-contained page: the table, then each sample row's thumbnail beside every job's answer) and
``comparison.png`` (bar charts of the main figures).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capflow.redaction import clean_message
from capflow.show import (
    Counts,
    Entry,
    check_readable,
    describe_ref,
    image_root,
    iter_entries,
    manifest_of,
    reading,
)

if TYPE_CHECKING:
    pass

DEFAULT_SAMPLE = 24
FILE_NAMES = ("comparison.json", "comparison.md", "comparison.html", "comparison.png")
_SPENT = ("prompt_tokens", "completion_tokens", "cost", "elapsed_s")
# Config keys that say where a run read or wrote, not how it captioned: never a label.
_WHERE = {"output", "failed_output", "storage.cache_path", "cache.path", "image.cache_path",
          "progress", "progress_interval"}
# Keys naming the dataset: a label only when the file names differ, not just their folders.
_DATASET = {"input", "storage.first_entry_file_name"}
_LABEL_VALUE_CHARS = 40


@dataclass(frozen=True)
class Job:
    """One output to compare.

    :param output: the output file.
    :param overrides: the values that label it; None: from its manifest (its swept values, else
        the config values that differ between the jobs).
    """

    output: Path
    overrides: dict[str, str] | None = None


@dataclass
class JobFigures:
    """What ``comparison.json`` says of one job (its ``jobs`` entries, in this order)."""

    label: str
    overrides: dict[str, str]
    output: str
    rows: int
    done: int
    failed: int
    mean_caption_chars: float
    median_caption_chars: float
    prompt_tokens: int
    completion_tokens: int
    cost: float
    elapsed_s: float
    answer_key: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SampleRow:
    """One sampled row: its place, its images and each job's entry for it (None: the job's
    output has no such row)."""

    index: int
    row_id: str | None
    images: tuple[object, ...]
    root: Path
    entries: tuple[Entry | None, ...]


@dataclass
class Comparison:
    """The figures of every job and the sample of rows, ready to be written."""

    jobs: list[JobFigures]
    samples: list[SampleRow]

    def as_json(self) -> dict[str, Any]:
        """The content of ``comparison.json``."""
        labels = [job.label for job in self.jobs]
        return {
            "jobs": [asdict(job) for job in self.jobs],
            "sample": [{
                "index": s.index,
                "id": s.row_id,
                "image": [describe_ref(ref) if _is_data_uri(ref) else ref for ref in s.images],
                "answers": {label: _cell_json(entry)
                            for label, entry in zip(labels, s.entries, strict=True)},
            } for s in self.samples],
        }

    def write(self, folder: Path) -> list[Path]:
        """Write the four files into ``folder`` (each atomically) and return their paths."""
        from capflow.comparison_page import markdown, page, png

        contents = (
            (json.dumps(self.as_json(), indent=2, ensure_ascii=False) + "\n").encode(),
            markdown(self).encode(), page(self).encode(), png(self))
        paths = [folder / name for name in FILE_NAMES]
        for path, data in zip(paths, contents, strict=True):
            _write(path, data)
        return paths


def compare(jobs: Sequence[Job | Path], sample: int = DEFAULT_SAMPLE,
            root: str | None = None) -> Comparison:
    """Compare the outputs of ``jobs``; ``sample`` rows are sampled, the same in every job.
    ``root`` is the folder relative image paths are read from (default: each run's input's).
    Raises ``capflow.show.ShowError`` (one line) for an output that cannot be read."""
    given = [job if isinstance(job, Job) else Job(Path(job)) for job in jobs]
    read = [_JobReading(job.output, root) for job in given]
    labels = _labels(given, read)
    figures = [r.figures(label, overrides)
               for r, (label, overrides) in zip(read, labels, strict=True)]
    return Comparison(figures, _samples(read, sample))


class _JobReading:
    """One output read once for its figures (and again, later, for its sample rows)."""

    def __init__(self, output: Path, root: str | None) -> None:
        check_readable(output)
        self.output = output.resolve()
        self.manifest, problem = manifest_of(output)
        self.notes = [problem] if problem else []
        last_step = _last_step(self.manifest)
        self.answer_key = str(last_step.get("output_answer_key") or "caption")
        self.image_key = str(last_step.get("input_image_key") or "image")
        self.root, _ = image_root(self.output, root, self.manifest)
        self.counts = Counts()
        self.lengths: list[int] = []
        for entry in self.entries():
            self.counts.add(entry)
            if entry.error is None and entry.caption is not None:
                self.lengths.append(len(answer_text(entry.answer)))

    def entries(self) -> Generator[Entry, None, None]:
        return reading(self.output, iter_entries(self.output, self.answer_key, self.image_key))

    def figures(self, label: str, overrides: dict[str, str]) -> JobFigures:
        spent, notes = _spent(self.output, self.manifest)
        lengths = self.lengths
        return JobFigures(
            label=label, overrides=overrides, output=str(self.output), rows=self.counts.rows,
            done=self.counts.captioned, failed=self.counts.failed,
            mean_caption_chars=round(statistics.fmean(lengths), 1) if lengths else 0.0,
            median_caption_chars=round(float(statistics.median(lengths)), 1) if lengths else 0.0,
            prompt_tokens=int(spent["prompt_tokens"]),
            completion_tokens=int(spent["completion_tokens"]),
            cost=round(spent["cost"], 6), elapsed_s=round(spent["elapsed_s"], 3),
            answer_key=self.answer_key, notes=self.notes + notes)


def answer_text(answer: object) -> str:
    """The text whose characters are counted: a string as it is; a JSON object's ``caption``
    string when it has one, else its compact JSON text."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("caption"), str):
        return answer["caption"]
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def _last_step(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """The config of the pipeline's last step (whose answer key is the output's), or {}."""
    config = (manifest or {}).get("config")
    pipeline = config.get("pipeline") if isinstance(config, dict) else None
    steps = pipeline.get("steps") if isinstance(pipeline, dict) else None
    if isinstance(steps, dict) and steps:
        last = list(steps.values())[-1]
        if isinstance(last, dict):
            return last
    return {}


def _spent(output: Path, manifest: dict[str, Any] | None) -> tuple[dict[str, float], list[str]]:
    """What every step of the pipeline that built ``output`` spent, from their manifests'
    ``output_spent``, and notes on what could not be counted."""
    total = dict.fromkeys(_SPENT, 0.0)
    if manifest is None:
        return total, ["no run manifest beside the output: tokens, cost and time not counted"]
    step = manifest.get("step")
    outputs = step.get("outputs") if isinstance(step, dict) else None
    paths = [Path(p) for p in outputs if isinstance(p, str)] if isinstance(outputs, list) else []
    notes = []
    for path in paths or [output]:
        found = manifest if path.resolve() == output else manifest_of(path)[0]
        if found is None:
            notes.append(f"no run manifest for the step output {path}: not counted")
            continue
        spent = found.get("output_spent")
        for key in _SPENT:
            value = spent.get(key) if isinstance(spent, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] += value
    return total, notes


# -- labels --------------------------------------------------------------------------------


def _labels(jobs: list[Job], read: list[_JobReading]) -> list[tuple[str, dict[str, str]]]:
    """Each job's label and the values it is made of, distinct between the jobs."""
    configs = [r.manifest.get("config") if r.manifest else None for r in read]
    differing = _differing([c for c in configs if isinstance(c, dict)])
    where = _path_labels([r.output for r in read])
    out = []
    for job, r, config in zip(jobs, read, configs, strict=True):
        overrides = job.overrides
        sweep = r.manifest.get("sweep") if r.manifest else None
        if overrides is None and isinstance(sweep, dict) and isinstance(sweep.get("overrides"),
                                                                        dict):
            overrides = {str(k): str(v) for k, v in sweep["overrides"].items()}
        if not overrides and isinstance(config, dict):
            flat = _flatten(config)
            overrides = {key: _clip(flat.get(key, "(unset)")) for key in differing}
        overrides = overrides or {}
        out.append((", ".join(f"{k}={v}" for k, v in overrides.items()), overrides))
    seen = [label for label, _ in out]
    # Two jobs alike (or one without a label): their paths tell them apart, and a number
    # the same output given twice (answers are keyed by label).
    labelled: list[tuple[str, dict[str, str]]] = []
    for (label, overrides), path in zip(out, where, strict=True):
        if not label or seen.count(label) > 1:
            label = f"{label} ({path})" if label else path
        taken = {done for done, _ in labelled}
        unique = next(f"{label} #{n}" for n in itertools.count(2) if f"{label} #{n}" not in taken)
        labelled.append((label if label not in taken else unique, overrides))
    return labelled


def _differing(configs: list[dict[str, Any]]) -> list[str]:
    """The config keys (dotted) whose values differ between ``configs``, less those that say
    where a run read or wrote, copies of another differing key (``${...}`` interpolations) and
    keys beside a differing ``name`` (``prompt.name`` stands for its whole group)."""
    if len(configs) < 2:
        return []
    flats = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    columns: dict[tuple[str, ...], list[str]] = {}
    for key in keys:
        if key in _WHERE or key.startswith("hydra."):
            continue
        values = tuple(flat.get(key, "") for flat in flats)
        if key in _DATASET:
            values = tuple(os.path.basename(v) for v in values)
        if len(set(values)) > 1:
            columns.setdefault(values, []).append(key)
    kept = {min(same, key=lambda k: (k.count("."), len(k), k)) for same in columns.values()}
    groups = {k.removesuffix("name") for k in kept if k.endswith(".name")}
    return [k for k in keys if k in kept and not any(
        k.startswith(g) and not k.endswith(".name") for g in groups)]


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A config as ``{"dotted.key": value as text}``."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}{key}."))
        return out
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return {prefix[:-1]: text}


def _clip(text: str) -> str:
    text = clean_message(text, None)
    return text if len(text) <= _LABEL_VALUE_CHARS else text[:_LABEL_VALUE_CHARS - 3] + "..."


def _path_labels(outputs: list[Path]) -> list[str]:
    """The outputs' paths from the folder they share (their names, when they share one)."""
    if len(outputs) < 2:
        return [p.name for p in outputs]
    common = os.path.commonpath([str(p.parent) for p in outputs])
    return [os.path.relpath(p, common) for p in outputs]


# -- the sample ----------------------------------------------------------------------------


def sample_indices(rows: int, wanted: int) -> list[int]:
    """``wanted`` row indices spread evenly over ``rows`` rows: the middle of each of
    ``wanted`` equal stretches (as ``capflow show`` picks its samples)."""
    wanted = max(0, min(wanted, rows))
    return sorted({(2 * k + 1) * rows // (2 * wanted) for k in range(wanted)})


def _samples(read: list[_JobReading], wanted: int) -> list[SampleRow]:
    """The same rows of every job: spread over the shortest output, so that each has them."""
    indices = sample_indices(min((r.counts.rows for r in read), default=0), wanted)
    if not indices:
        return []
    wanted_set = set(indices)
    picked: list[dict[int, Entry]] = []
    for r in read:
        with contextlib.closing(r.entries()) as stream:
            rows = itertools.islice(stream, indices[-1] + 1)
            picked.append({e.index: e for e in rows if e.index in wanted_set})
    if len({r.counts.rows for r in read}) > 1:
        # Outputs of different lengths (a filter step dropped rows): the same position is not
        # the same row, its id is.
        picked = _by_id(read, picked) or picked
    samples = []
    for index in indices:
        entries = tuple(p.get(index) for p in picked)
        # The row's image and id as the first job that has the row holds them.
        first, where = next(((e, r) for e, r in zip(entries, read, strict=True) if e),
                            (None, read[0]))
        samples.append(SampleRow(index, first.row_id if first else None,
                                 first.images if first else (), where.root, entries))
    return samples


def _by_id(read: list[_JobReading], picked: list[dict[int, Entry]]
           ) -> list[dict[int, Entry]] | None:
    """Each job's rows with the ids of the shortest output's sampled rows, under those rows'
    indices; None when some sampled row has no id."""
    shortest = min(range(len(read)), key=lambda n: read[n].counts.rows)
    ids = {e.row_id: index for index, e in picked[shortest].items()}
    if not ids or None in ids or len(ids) < len(picked[shortest]):
        return None
    matched: list[dict[int, Entry]] = []
    for r in read:
        with contextlib.closing(r.entries()) as stream:
            matched.append({ids[e.row_id]: e for e in stream if e.row_id in ids})
    return matched


def _cell_json(entry: Entry | None) -> dict[str, Any]:
    if entry is None:
        return {"answer": None, "error": {"type": "NoSuchRow", "message": "no such row"}}
    error = {"type": entry.error[0], "message": entry.error[1]} if entry.error else None
    return {"answer": None if error else entry.answer, "error": error}


def _is_data_uri(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith("data:")


def _write(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o644 & ~mask)  # mkstemp makes it private; a report is for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
