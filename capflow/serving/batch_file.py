"""BatchFileServing: ``serving=batch_file``, batch request lines written to a file for an
offline batch runner (``vllm run-batch``, or any tool reading OpenAI's batch format), and its
results file read back into rows on a later run.

A first run writes every request line to ``requests_file`` (each line once: the ledger records
what was written, so a rerun appends only new lines) and ends with the rows marked
``BatchSubmitted``. Run the batch, e.g.
``vllm run-batch -i requests.jsonl -o results.jsonl --model M``, then the same command with
``serving.results_file=results.jsonl``: each row is answered from its line's result, through the
same parsing as live answers; a line the results file does not answer is written again.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from capflow.errors import ConfigError, ServingError
from capflow.request import Request, Response
from capflow.serving._protocol import parse_completion
from capflow.serving.batch_ledger import BatchLedger
from capflow.serving.openai_batch import OpenAIBatchServing, _line_error

FILE_BATCH = "file"  # the remote id of the lines written to the requests file


class BatchFileServing(OpenAIBatchServing):
    """Batch lines through files instead of an API.

    :param requests_file: where request lines are written (appended to by later runs).
    :param results_file: a batch runner's output file to read answers from (None: none yet).
    """

    def __init__(self, *args: Any, requests_file: str = "batch_requests.jsonl",
                 results_file: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("api_url", None)
        super().__init__(*args, **kwargs)
        self.requests_file = Path(requests_file)
        self.results_file = Path(results_file) if results_file else None
        self._results: dict[str, dict[str, Any]] = {}

    def unavailable(self) -> str | None:
        return None  # nothing is sent: the files are the exchange

    async def start(self) -> None:
        if not self.model_name:
            raise ConfigError("serving=batch_file needs model_name=...: every line names it")
        if self.results_file is not None:
            if not self.results_file.is_file():
                raise ConfigError(f"serving.results_file not found: {self.results_file}")
            self._results = _read_results(self.results_file)
        self._ledger = BatchLedger(self.ledger_path)

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush()
        for task in list(self._tasks):
            await task
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    async def complete(self, request: Request) -> Response:
        assert self._ledger is not None
        custom_id, body = self.line_for(request)
        record = self._results.get(custom_id)
        if record is not None:
            response = record.get("response") or {}
            if isinstance(response, dict) and response.get("status_code") == 200:
                self._ledger.done(custom_id, json.dumps(response.get("body")))
                return parse_completion(response.get("body"))
            error = _line_error(record)
            raise ServingError(error.kind, str(error), transient=False)
        line = self._ledger.line(custom_id)
        if line is None or line.state not in ("submitted", "done"):
            future = self._waiting.get(custom_id)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                self._waiting[custom_id] = future
                self._queue(custom_id, body)
            return await asyncio.shield(future)
        if line.state == "done" and line.result:
            return parse_completion(json.loads(line.result))
        raise self._pending_error()

    def _pending_error(self) -> ServingError:
        wanted = "a results file" if self.results_file is None else \
            f"its answer, which {self.results_file} does not have"
        return ServingError(
            "BatchSubmitted", f"written to {self.requests_file}, waiting for {wanted}: run the"
            " batch (vllm run-batch -i REQUESTS -o RESULTS --model M), then the same command"
            " with serving.results_file=RESULTS", transient=False)

    async def _submit(self, lines: list[tuple[str, bytes]]) -> None:
        assert self._ledger is not None
        local = os.urandom(16).hex()
        ids = [custom_id for custom_id, _ in lines]
        self._ledger.begin(local, ids)
        self.requests_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.requests_file, "ab") as f:
            for _, line in lines:
                f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._ledger.submitted(local, FILE_BATCH)
        self._fail(ids, self._pending_error())


def _read_results(path: Path) -> dict[str, dict[str, Any]]:
    """A batch output (or error) file's records, by ``custom_id``."""
    out: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                raise ConfigError(f"{path}:{number}: not a JSON line of batch results") from None
            if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
                out[record["custom_id"]] = record
    return out
