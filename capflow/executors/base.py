"""The executor interface: a ``Job`` built from the composed config, carried out by ``run``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.operators.base import Operator
    from capflow.run import RunSummary
    from capflow.serving.base import Serving
    from capflow.storage.base import Storage


@dataclass
class Job:
    """One run of a pipeline, its parts built from the config.

    :param storage: where rows come from and go (its ``step()`` views are the steps').
    :param serving: who answers.
    :param steps: the pipeline's steps, by name, in order.
    :param settings: the engine's settings (retries, cache, budgets, run context).
    :param output: where the last step's rows go (None: the storage's step file).
    :param dry_run: prepare every request, send none.
    :param config: the composed config, resolved, with no secret in it (keys live in the
        environment): an executor that runs steps in other processes builds them from it.
    """

    storage: Storage
    serving: Serving
    steps: list[tuple[str, Operator]]
    settings: EngineSettings
    output: str | None = None
    dry_run: bool = False
    config: dict[str, Any] = field(default_factory=dict)


class Executor(ABC):
    """Carries a job out: runs each step over every row and returns one summary per step run.

    Example, an executor that logs before running locally::

        class Announcing(LocalExecutor):
            def run(self, job):
                print(f"running {len(job.steps)} steps")
                return super().run(job)
    """

    @abstractmethod
    def run(self, job: Job) -> list[RunSummary]:
        """Run ``job``'s steps in order; a dry run stops after the first (later steps read rows
        it does not write)."""
