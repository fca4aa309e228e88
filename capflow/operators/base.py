"""The operator interface: turns a row into a request, and the response back into the row."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from capflow.errors import RowError
from capflow.request import Request, Response
from capflow.rows import Row

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.run import RunSummary
    from capflow.serving.base import Serving
    from capflow.storage.base import Storage


class Operator(ABC):
    """One pipeline step. Subclasses implement ``prepare`` and ``apply``; ``run`` drives the
    engine over a storage step, as in ``op.run(storage=storage.step(), ...)``."""

    serving: Serving
    #: Whether the step sends requests: those built from the config are given the ``serving``
    #: (a ``MapStep``, which sends none, is not).
    sends_requests: ClassVar[bool] = True

    @abstractmethod
    def prepare(self, row: Row, base_dir: Path) -> Request:
        """Build the request for ``row``. Raise ``capflow.errors.RowError`` for bad input: the
        row then fails with that message and no request is sent. Runs in a worker thread."""

    @abstractmethod
    def apply(self, row: Row, response: Response) -> dict[str, Any]:
        """The output fields to add to ``row`` for ``response``. Raise
        ``capflow.errors.RowError`` for an answer that cannot stand (``reask`` may then ask
        again); runs on the event loop, so keep it quick."""

    def reask(self, request: Request, response: Response, error: RowError,
              attempt: int) -> Request | None:
        """The request that asks again when ``apply`` refused ``response`` with ``error`` (an
        answer that does not match the output schema, say), or None to let the row fail.
        ``attempt`` counts the times this row was asked again so far. The default never asks
        again.

        Example: ask once more, telling the model what was wrong::

            def reask(self, request, response, error, attempt):
                if attempt >= 1:
                    return None
                turns = [{"role": "assistant", "content": response.text},
                         {"role": "user", "content": f"{error}. Please answer again."}]
                return Request([*request.messages, *turns], body=request.body)
        """
        return None

    def describe(self) -> dict[str, Any]:
        """Settings that change the output; a change starts the step's journal afresh."""
        return {"operator": type(self).__name__}

    def run(
        self,
        storage: Storage,
        *,
        dry_run: bool = False,
        settings: EngineSettings | None = None,
        **keys: Any,
    ) -> RunSummary:
        """Run this operator over every row of ``storage`` (a ``storage.step()`` view).

        ``keys`` override the operator's key settings for this run (``input_image_key=...``).
        Returns the run's summary; failed rows are in the output with an error record.
        """
        from capflow.engine import EngineSettings, run_step

        for name, value in keys.items():
            if not hasattr(self, name):
                raise TypeError(f"{type(self).__name__}.run() got an unknown setting {name!r}")
            setattr(self, name, value)
        if settings is None:
            # The response cache sits beside the storage's step files, as in the CLI.
            cache_dir = getattr(storage, "cache_path", None)
            cache = str(Path(cache_dir) / "responses.sqlite") if cache_dir else None
            settings = EngineSettings(cache_path=cache)
        return run_step(self, storage, settings, dry_run=dry_run)
