"""The plugin's settings, read from the ``metrics`` key of a run's composed config.

capflow hands observers the composed config at run start (``RunInfo.config``). The option
``+metrics=files`` puts a ``metrics`` mapping in it; without that option there is no such key,
and the plugin stays idle: installed but not asked for, it writes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Labels the textfile sets itself; a user's label of the same name would clash with them.
RESERVED_LABELS = frozenset({"output", "status", "type", "phase", "quantile", "kind"})
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class SettingsError(ValueError):
    """The ``metrics`` config cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class MetricsSettings:
    """What to write and where, for one run.

    :param dir: the folder of both files.
    :param rows: write the per-row JSON Lines file.
    :param append: add the run's rows to that file rather than replace it.
    :param textfile: write the Prometheus textfile at the end of the run.
    :param flush_seconds: longest time a finished row's line stays buffered in memory.
    :param labels: more labels put on every metric of the textfile.
    :param job: the sweep job's number when the jobs of a sweep share ``dir``, else None.
    """

    dir: Path
    job: int | None = None
    rows: bool = True
    append: bool = False
    textfile: bool = True
    flush_seconds: float = 1.0
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MetricsSettings | None:
        """The settings in a run's composed config; None when the run did not ask for metrics
        (no ``metrics`` mapping: the option was not chosen, or the run was started from
        Python). Raises SettingsError for a ``metrics`` mapping that cannot be used."""
        node = config.get("metrics") if isinstance(config, Mapping) else None
        if not isinstance(node, Mapping) or "dir" not in node:
            return None
        directory = node.get("dir")
        if not isinstance(directory, str) or not directory.strip():
            raise SettingsError(f"metrics.dir must be a folder name, not {directory!r}")
        flush = node.get("flush_seconds", 1.0)
        if isinstance(flush, bool) or not isinstance(flush, (int, float)) or flush < 0:
            raise SettingsError(f"metrics.flush_seconds must be a number >= 0, not {flush!r}")
        folder, job = _sweep_job(Path(directory))
        return cls(
            dir=folder,
            job=job,
            rows=_flag(node, "rows"),
            append=_flag(node, "append", default=False),
            textfile=_flag(node, "textfile"),
            flush_seconds=float(flush),
            labels=_labels(node.get("labels")),
        )

    @property
    def writes_anything(self) -> bool:
        """Whether these settings ask for any file at all."""
        return self.rows or self.textfile


def _flag(node: Mapping[str, Any], key: str, default: bool = True) -> bool:
    value = node.get(key, default)
    if not isinstance(value, bool):
        raise SettingsError(f"metrics.{key} must be true or false, not {value!r}")
    return value


def _labels(value: Any) -> dict[str, str]:
    """``metrics.labels`` as label name -> value, names checked against Prometheus' rules."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(f"metrics.labels must be a mapping of names to values, not {value!r}")
    labels = {}
    for name, label_value in value.items():
        name = str(name)
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise SettingsError(f"metrics.labels.{name}: not a valid Prometheus label name")
        if name in RESERVED_LABELS:
            raise SettingsError(f"metrics.labels.{name}: the textfile sets this label itself")
        labels[name] = "" if label_value is None else str(label_value)
    return labels


def _sweep_job(directory: Path) -> tuple[Path, int | None]:
    """Where a sweep's job writes, as capflow does with ``output``: a relative folder goes into
    each job's own folder. An absolute one is shared by the jobs (node_exporter's textfile
    folder, say): the job's number is returned, to go into the file names, so that the jobs of
    a sweep never write over each other's files. Outside a sweep: the folder, and None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return directory, None
        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            return directory, None
        if directory.is_absolute():
            return directory, int(hydra.job.num)
        return Path(hydra.runtime.output_dir) / directory, None
    except Exception:  # noqa: BLE001 - no Hydra job around: the folder is taken as it is
        return directory, None
