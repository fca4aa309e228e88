"""Hydra's folder for a run (``.capflow/runs/<time>/``: the composed config and the run's log):
kept when the run did something, removed when nothing ran (a mistake caught before anything
was sent leaves nothing on disk)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from capflow import engine

record = logging.getLogger("capflow.record")


def note(line: str) -> None:
    """Keep ``line`` (an error, a stop) in the run's log file."""
    record.error("%s", line)


def discard_if_nothing_ran() -> None:
    """Remove this run's folder under ``.capflow/runs/`` when no step wrote anything."""
    if engine.outputs_written:
        return
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
    except ValueError:  # not under Hydra (the Python API)
        return
    if hydra.mode == RunMode.MULTIRUN:
        return  # a sweep's folders hold its jobs' outputs
    folder = Path(hydra.runtime.output_dir)
    # Only capflow's own layout: a folder a user named with hydra.run.dir is theirs.
    if folder.parent.name != "runs" or folder.parent.parent.name != ".capflow":
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in (folder.parent, folder.parent.parent):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only when empty
