"""LocalExecutor: the steps run one after the other in this process, on capflow's engine."""

from __future__ import annotations

import dataclasses
import os

from capflow.executors.base import Executor, Job
from capflow.manifest import RunContext
from capflow.run import RunSummary


class LocalExecutor(Executor):
    """Runs each step with its operator's ``run`` over the storage's step views, in order."""

    def run(self, job: Job) -> list[RunSummary]:
        n = len(job.steps)
        views = [job.storage.step(output=job.output if i == n - 1 else None) for i in range(n)]
        outputs = [os.path.abspath(view.output_name) for view in views]
        context = job.settings.run_context or RunContext()
        summaries = []
        for i, ((name, op), view) in enumerate(zip(job.steps, views, strict=True)):
            step = {"number": i + 1, "of": n, "name": name, "outputs": outputs}
            settings = dataclasses.replace(
                job.settings, run_context=dataclasses.replace(context, step=step))
            summaries.append(op.run(view, dry_run=job.dry_run, settings=settings))
            if job.dry_run:
                break  # later steps read rows that a dry run does not write
        return summaries
