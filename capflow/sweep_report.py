"""The comparison a sweep writes when its last job is done: ``comparison.json``, ``.md``,
``.html`` and ``.png`` in the sweep folder (see ``capflow/comparison.py``).

A Hydra callback, registered in ``conf/config.yaml`` under ``hydra.callbacks.compare``. The
jobs are found from what they left on disk, so the callback needs nothing from the launcher:
the run manifests (``<output>.run.json``) in the sweep folder that name this sweep and the
pipeline's last step, one per job. Writing the comparison never fails the sweep.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from capflow.comparison import DEFAULT_SAMPLE
from capflow.show import MANIFEST_SUFFIX, manifest_of

# The job folder, then at most a few folders of a relative output (out/run1/o.jsonl).
MAX_DEPTH = 4


class SweepReport(Callback):
    """Writes the comparison of a sweep's jobs into its folder.

    :param sample: the number of rows sampled for the side-by-side answers (the same rows in
        every job).
    """

    def __init__(self, sample: int = DEFAULT_SAMPLE) -> None:
        self.sample = int(sample)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Compare the jobs of the sweep that just ended; one line says where the files are,
        or why they could not be written. A sweep that wrote no output (a dry run) gets none."""
        try:
            folder = Path(os.path.abspath(str(config.hydra.sweep.dir)))
            outputs = sweep_outputs(folder)
            if not outputs:
                return
            from capflow.comparison import compare

            compare(outputs, sample=self.sample).write(folder)
        except Exception as exc:  # the sweep's outputs are written: a report must not fail it
            from capflow.redaction import clean_message

            reason = clean_message(str(exc) or type(exc).__name__, 300)
            print(f"capflow: could not write the comparison: {reason}", file=sys.stderr)
            return
        print(f"comparison of {len(outputs)} jobs: {folder / 'comparison.html'}"
              " (and .json, .md, .png)", flush=True)


def sweep_outputs(folder: Path) -> list[Path]:
    """The final output of each job of the sweep in ``folder``, in job order: one per job
    number (the newest, should a job have written several)."""
    newest: dict[int, tuple[float, Path]] = {}
    here = os.path.realpath(folder)
    for manifest_file in _manifests(folder, MAX_DEPTH):
        output = manifest_file.with_name(manifest_file.name.removesuffix(MANIFEST_SUFFIX))
        manifest, _ = manifest_of(output)
        if manifest is None or not output.is_file():
            continue
        sweep, step = manifest.get("sweep"), manifest.get("step")
        if not isinstance(sweep, dict) or not isinstance(sweep.get("dir"), str):
            continue
        job = sweep.get("job")
        if os.path.realpath(sweep["dir"]) != here or not isinstance(job, int):
            continue
        if isinstance(step, dict) and step.get("number") != step.get("of"):
            continue  # an earlier step's output: its figures count in the final one's
        made = manifest_file.stat().st_mtime
        if job not in newest or made > newest[job][0]:
            newest[job] = (made, output)
    return [newest[job][1] for job in sorted(newest)]


def _manifests(folder: Path, depth: int) -> Iterator[Path]:
    """The manifests in ``folder`` and its subfolders, ``depth`` levels down at most; hidden
    folders (Hydra's ``.hydra``) and links to folders are passed over."""
    try:
        with os.scandir(folder) as listing:
            found = list(listing)
    except OSError:
        return
    for item in sorted(found, key=lambda i: i.name):
        if item.name.endswith(MANIFEST_SUFFIX) and item.is_file():
            yield Path(item.path)
        elif depth > 1 and not item.name.startswith(".") and item.is_dir(follow_symlinks=False):
            yield from _manifests(Path(item.path), depth - 1)
