"""The Prometheus text format, as node_exporter's textfile collector reads it, and writing it
atomically.

node_exporter reads every ``*.prom`` file of its textfile folder at each scrape; a file being
written would be read half-way. So the text goes to a temporary file in the same folder, whose
name does not end in ``.prom``, and replaces the old file with ``os.replace`` in one step.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

Labels = Mapping[str, str]


@dataclass
class Metric:
    """One metric family: ``# HELP``, ``# TYPE`` and its samples.

    Each sample is ``(suffix, labels, value)``: the suffix is appended to the family's name
    (``"_sum"``, ``"_count"`` for a summary; ``""`` otherwise).
    """

    name: str
    kind: str  # counter, gauge, summary or untyped
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, labels: Labels | None = None, suffix: str = "") -> Metric:
        """Append a sample; returns the metric, so that calls chain."""
        self.samples.append((suffix, dict(labels or {}), value))
        return self


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a fraction, ``+Inf``,
    ``-Inf`` and ``NaN`` spelt its way."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(labels: Labels) -> str:
    """``{a="1",b="2"}``, or ``""`` for no labels."""
    if not labels:
        return ""
    inner = ",".join(f'{name}="{_escape_label(str(value))}"' for name, value in labels.items())
    return "{" + inner + "}"


def format_metrics(metrics: Iterable[Metric]) -> str:
    """The text of a textfile: each family's ``# HELP`` and ``# TYPE`` lines, then its
    samples; families without samples are left out (node_exporter rejects none, but they say
    nothing)."""
    lines: list[str] = []
    for metric in metrics:
        if not metric.samples:
            continue
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for suffix, labels, value in metric.samples:
            lines.append(f"{metric.name}{suffix}{format_labels(labels)} {format_value(value)}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a
    part: a temporary file beside it (named ``.<name>.*.tmp``, which the collector ignores),
    flushed to disk, then ``os.replace``. The temporary file is removed if anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it 0600: node_exporter often runs as another user
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
