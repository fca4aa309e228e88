"""What a sweep (``capflow -m prompt=a,b``) knows of itself: which keys it sweeps, each job's
values, and the job folders named after them (``prompt=a``, not ``0``).

Hydra tells a job its overrides but not which of them are swept. The ``capflow`` command finds
the swept keys on its command line and hands them to every job through the environment, so a
job run by another launcher (in another process) knows them too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

SWEPT_KEYS_ENV = "CAPFLOW_SWEPT_KEYS"
_UNSAFE = re.compile(r"[^\w.=,+-]+")
_MAX_NAME = 120


def swept_keys(overrides: Iterable[str]) -> list[str]:
    """The keys that a command line's overrides sweep (``prompt=a,b``, ``x=range(3)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # not an override Hydra takes: Hydra will say so
            continue
        if override.is_sweep_override():
            keys.append(override.get_key_element())
    return keys


def remember_swept_keys(overrides: Iterable[str]) -> None:
    """Tell the jobs of this command's sweep which keys it sweeps."""
    os.environ[SWEPT_KEYS_ENV] = "\n".join(swept_keys(overrides))


def job_overrides(task: Iterable[str]) -> dict[str, str]:
    """This job's values of the swept keys, from its overrides (Hydra's ``overrides.task``)."""
    keys = os.environ.get(SWEPT_KEYS_ENV)
    wanted = set(keys.split("\n")) if keys else None
    values = {}
    for text in task:
        key, sep, value = str(text).partition("=")
        if sep and (wanted is None or key in wanted):
            values[key] = value
    return values


def job_dir_name(num: Any, task: Iterable[str]) -> str:
    """A job's folder in the sweep folder: its swept values (``prompt=concise``), made safe
    for a file name; the job's number when nothing is swept or the name would clash."""
    values = job_overrides(task) if os.environ.get(SWEPT_KEYS_ENV) else {}
    if not values:
        return str(num)
    name = ",".join(f"{k}={v}" for k, v in values.items())
    safe = _UNSAFE.sub("_", name).strip("._") or str(num)
    if safe != name or len(safe) > _MAX_NAME:
        # Two values may be made safe alike (a/b, a_b): the number keeps their folders apart.
        safe = f"{num}_{safe[:_MAX_NAME]}"
    return safe


def context() -> dict[str, Any] | None:
    """This job's place in its sweep, for the run manifest; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return {
        "dir": os.path.abspath(hydra.sweep.dir),
        "job": hydra.job.num,
        "overrides": job_overrides(hydra.overrides.task),
    }
