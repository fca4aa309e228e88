"""The actor: capflow's own engine over each batch of rows Ray Data hands it.

An actor builds the serving and the pipeline's steps from the composed config once, then runs
every step over each batch in turn, exactly as ``executor=local`` runs them over a file: image
preparation, the shared response cache (every answer committed as it comes, so a killed job
pays again only for what was in flight), retries, adaptive sending and per-row error records.
A batch's rows travel as their JSON text, so every field comes back as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from capflow import MapStep, Operator, Row, RunSummary, Serving, Storage

# Figures of a step's summary an actor reports for each batch; the driver adds them up.
FIGURES = ("rows", "done", "failed", "skipped", "requests", "retries", "prompt_tokens",
           "completion_tokens", "cache_hits", "images", "image_bytes", "estimated_usage",
           "rate_limited", "outages", "dropped", "cache_size")


class BatchStorage(Storage):
    """One batch of rows as a storage step: read from memory, written to memory."""

    rows_as = "json"

    def __init__(self, rows: list[Row], base_dir: Path, folder: Path, step: int) -> None:
        self.rows = rows
        self._base_dir = base_dir
        self.folder = folder
        self.number = step
        self.lines: list[str] = []

    def step(self, output: str | None = None) -> BatchStorage:
        return self

    def read(self) -> Iterator[Row]:
        return iter(self.rows)

    def count(self, cheap_only: bool = False) -> int | None:
        return len(self.rows)

    @property
    def reads_earlier_step(self) -> bool:
        return self.number > 1

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def input_name(self) -> str:
        return f"batch step {self.number}"

    @property
    def output_name(self) -> str:
        return str(self.folder / f"step{self.number}.jsonl")

    def input_identity(self) -> str:
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update((row.raw or json.dumps(row.data)).encode())
        return digest.hexdigest()

    def journal_path(self) -> Path:
        return self.folder / f"step{self.number}.journal.sqlite"

    def write(self, rows: Iterable[Any]) -> None:
        self.lines = list(rows)


class CapflowWorker:
    """Runs the pipeline's steps over batches: ``{"row", "error", "error_type"}`` columns in,
    ``{"row", "kind"}`` out: each finished row's JSON text (``kind`` empty); one record of
    kind ``figures`` holding, as JSON, the figures of each step over the batch; and each row a
    map step dropped, of kind ``dropped:<step number>``, for the driver to list.

    Token and cost budgets are this actor's share for its whole life, not for each batch: what
    each batch spent is taken off what the next may spend."""

    def __init__(self, config: dict[str, Any], base_dir: str) -> None:
        from omegaconf import OmegaConf

        from capflow.app import build, engine_settings

        cfg = OmegaConf.create(config)
        self.serving = build(cfg.serving, Serving, "serving")
        self.steps: list[Operator] = [
            build(node, Operator, f"pipeline.steps.{name}", serving=self.serving)
            for name, node in cfg.pipeline.steps.items()
        ]
        self.settings = dataclasses.replace(engine_settings(cfg), progress=False, report=False,
                                            failed_output=None, run_context=None)
        self.base_dir = Path(base_dir)
        self.spent_tokens = 0
        self.spent_cost = 0.0
        self.last_batch_end = 0.0

    def _stop_rules(self) -> Any:
        rules = self.settings.stop
        left_tokens = (None if rules.max_tokens_total is None
                       else max(0, int(rules.max_tokens_total - self.spent_tokens)))
        left_cost = None if rules.max_cost is None else max(0.0, rules.max_cost - self.spent_cost)
        return dataclasses.replace(rules, max_tokens_total=left_tokens, max_cost=left_cost)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.settings.rpm:
            # Each batch's engine paces from its first request: one interval after the last
            # batch, so that two batches' requests are spaced as one run's would be.
            gap = 60.0 / self.settings.rpm - (time.monotonic() - self.last_batch_end)
            if gap > 0:
                time.sleep(gap)
        try:
            return self._run(batch)
        finally:
            self.last_batch_end = time.monotonic()

    def _run(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Each row keeps its index in the input: failures are reported by it.
        rows = [Row(int(i), json.loads(text), None, error=str(error), error_type=str(kind))
                if error else _row(int(i), text)
                for i, text, error, kind in zip(batch["index"], batch["row"], batch["error"],
                                                batch["error_type"], strict=True)]
        figures = []
        dropped: list[tuple[int, str]] = []
        folder = Path(tempfile.mkdtemp(prefix="capflow-ray-"))
        try:
            for number, op in enumerate(self.steps, 1):
                storage = BatchStorage(rows, self.base_dir, folder, number)
                drops = folder / f"dropped{number}.jsonl"
                if isinstance(op, MapStep):  # its dropped rows go back to the driver
                    op.dropped_output = str(drops)
                settings = dataclasses.replace(self.settings, stop=self._stop_rules())
                summary = op.run(storage, settings=settings)
                tokens = summary.prompt_tokens + summary.completion_tokens
                self.spent_tokens += tokens
                self.spent_cost += self.settings.stop.cost(summary.prompt_tokens,
                                                           summary.completion_tokens)
                figures.append(_figures(summary))
                if drops.exists():
                    dropped += [(number, line) for line in
                                drops.read_text(encoding="utf-8").splitlines() if line]
                indices = [row.index for row in rows]
                if len(storage.lines) != len(indices):  # a map step dropped some: renumber
                    indices = list(range(len(storage.lines)))
                rows = [_row(i, line) for i, line in zip(indices, storage.lines, strict=True)]
                if summary.stopped:
                    if number < len(self.steps):  # not through every step: not finished
                        rows = []
                    break
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        texts = [row.raw or json.dumps(row.data, ensure_ascii=False) for row in rows]
        return {"row": [*texts, json.dumps(figures), *(line for _, line in dropped)],
                "kind": [""] * len(texts) + ["figures"] + [f"dropped:{n}" for n, _ in dropped]}


def _row(index: int, text: str) -> Row:
    return Row(index, json.loads(text), text)


def _figures(summary: RunSummary) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(summary, name) for name in FIGURES}
    out["stopped"] = summary.stopped
    out["failures"] = summary.failures[:5]
    return out
