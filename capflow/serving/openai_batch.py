"""OpenAIBatchServing: ``serving=openai_batch``, the same requests through OpenAI's Batch API, at
about half the price, answered within the completion window.

Rows are prepared as for live requests; each request becomes a line of a batch input file
(``custom_id`` is a digest of its body, so the same row asked again is the same line). Lines
gather until a batch is full (``max_requests_per_batch``, ``max_bytes_per_batch``) or no new
line came for ``flush_after`` seconds; the batch is recorded in the ledger
(``capflow.serving.batch_ledger``), uploaded (``POST /v1/files``) and created
(``POST /v1/batches``, with the ledger's id in its metadata). It is polled every
``poll_interval`` seconds until it ends; its output file's answers go through the same parsing
as live answers, and to the rows waiting for them (the engine then caches and journals them).
Lines in the error file, and those an expired or failed batch left unanswered, go into a new
batch, up to ``max_batch_attempts`` times in all, then fail their rows with the server's
message.

A capflow killed at any moment and run again finds its batches in the ledger: it polls those it
created, asks the server about one it may have created just before the kill, and submits no
line again that a batch carries. With ``wait=false`` the run ends once its lines are submitted
(the rows say so, as ``BatchSubmitted`` errors); the same command run later collects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from capflow.errors import ConfigError, ServingError
from capflow.redaction import add_secret, clean_message
from capflow.request import Request, Response
from capflow.serving._protocol import parse_completion, server_message, status_error
from capflow.serving.batch_ledger import BatchLedger
from capflow.serving.openai import OpenAIServing

log = logging.getLogger("capflow")
ENDPOINT = "/v1/chat/completions"
FINAL = ("completed", "expired", "failed", "cancelled")


class OpenAIBatchServing(OpenAIServing):
    """``OpenAIServing``'s settings, sent through the Batch API.

    :param ledger: the batch ledger's SQLite file (beside the response cache by default).
    :param max_requests_per_batch: the most lines in one batch (the API allows 50,000).
    :param max_bytes_per_batch: the largest batch input file, in bytes (the API allows 200 MB).
    :param completion_window: the batch's deadline, as the API takes it (``24h``).
    :param poll_interval: seconds between two looks at a batch.
    :param flush_after: seconds without a new line after which the lines gathered so far are
        submitted.
    :param wait: wait for the batches and collect them; false: end once they are submitted.
    :param max_batch_attempts: batches a line may go in before its row fails.
    :param price_factor: the batch price as a fraction of the live one (``price.*`` in the
        config); the summary shows the cost at this price and what it saved.
    """

    #: Answers take minutes to hours: the engine neither adapts its sending to their latency
    #: nor bounds a row's wait.
    batched: ClassVar[bool] = True

    def __init__(self, *args: Any, ledger: str | None = None,
                 max_requests_per_batch: int = 50_000, max_bytes_per_batch: int = 190_000_000,
                 completion_window: str = "24h", poll_interval: float = 30.0,
                 flush_after: float = 1.0, wait: bool = True, max_batch_attempts: int = 3,
                 price_factor: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if int(max_requests_per_batch) < 1 or int(max_bytes_per_batch) < 1024:
            raise ConfigError("serving.max_requests_per_batch must be at least 1 and"
                              " serving.max_bytes_per_batch at least 1024")
        if int(max_batch_attempts) < 1 or float(poll_interval) <= 0:
            raise ConfigError("serving.max_batch_attempts must be at least 1 and"
                              " serving.poll_interval positive")
        self.ledger_path = Path(ledger) if ledger else Path("./cache_local/batches.sqlite")
        self.max_requests_per_batch = int(max_requests_per_batch)
        self.max_bytes_per_batch = int(max_bytes_per_batch)
        self.completion_window = str(completion_window)
        self.poll_interval = float(poll_interval)
        self.flush_after = float(flush_after)
        self.wait = bool(wait)
        self.max_batch_attempts = int(max_batch_attempts)
        self.price_factor = float(price_factor)
        self._ledger: BatchLedger | None = None
        self._api: Any = None
        self._waiting: dict[str, asyncio.Future[Response]] = {}
        self._pending: list[tuple[str, bytes]] = []
        self._queued: set[str] = set()  # the custom_ids in _pending
        self._not_ready: set[str] = set()  # batches seen running with wait=false
        self._pending_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._polling: set[str] = set()  # local ids of the batches being polled
        self._inputs: dict[str, dict[Any, Any]] = {}  # input files read back, by file id

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "serving": type(self).__name__}

    # -- start and stop -----------------------------------------------------------------------

    async def start(self) -> None:
        if not self.api_url:
            raise ConfigError("serving.api_url is not set (e.g. api_url=http://127.0.0.1:8000/v1)")
        from openai import AsyncOpenAI

        key = os.environ.get(self.key_name_of_api_key) if self.key_name_of_api_key else None
        add_secret(key)
        # An upload of a large batch file takes longer than a chat request.
        self._api = AsyncOpenAI(base_url=self.api_url, api_key=key or "none",
                                timeout=max(self.timeout, 600.0), max_retries=3)
        if not self.model_name:
            raise ConfigError("serving=openai_batch needs model_name=...: a batch names its"
                              " model in every line")
        self._ledger = BatchLedger(self.ledger_path)
        await self._find_unrecorded()
        for batch in self._ledger.open_batches():
            if batch.remote:
                log.info("batch %s (%s) was submitted by an earlier run: collecting it",
                         batch.remote, batch.local)

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._api is not None:
            await self._api.close()
            self._api = None
        if self._ledger is not None:
            running = [b.remote for b in self._ledger.open_batches() if b.remote]
            if running:
                print(f"capflow: {len(running)} batch(es) still running on the server"
                      f" ({', '.join(running[:5])}): run the same command again to collect"
                      " their answers", flush=True)
            self._ledger.close()
            self._ledger = None

    async def _find_unrecorded(self) -> None:
        """Batches recorded but not known to have been created (a kill between the two): the
        server's list says, by their metadata, whether they were; those that were not go."""
        assert self._ledger is not None
        unknown = {b.local: b for b in self._ledger.open_batches() if not b.remote}
        if not unknown:
            return
        async for batch in self._api.batches.list(limit=100):
            local = (batch.metadata or {}).get("capflow_batch")
            if local in unknown:
                self._ledger.submitted(local, batch.id)
                del unknown[local]
            if not unknown:
                break
        for local in unknown:
            self._ledger.dropped(local)

    # -- one request --------------------------------------------------------------------------

    def line_for(self, request: Request) -> tuple[str, dict[str, Any]]:
        """The request's batch line: its ``custom_id`` (a digest of the body, so the same row
        asked again is the same line) and its body."""
        body = {"model": self.model_name, "messages": request.messages, **self.params,
                **request.body, **self.extra_body}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40], body

    async def complete(self, request: Request) -> Response:
        assert self._ledger is not None
        custom_id, body = self.line_for(request)
        future = self._waiting.get(custom_id)
        if future is None:
            line = self._ledger.line(custom_id)
            if line is not None and line.state == "done" and line.result:
                return parse_completion(json.loads(line.result))
            batch = self._ledger.batch(line.local) if line is not None and line.local and \
                line.state in ("queued", "submitted") else None
            if batch is not None and batch.local in self._not_ready:
                raise self._not_collected(batch.remote or "?")
            future = asyncio.get_running_loop().create_future()
            self._waiting[custom_id] = future
            if batch is not None and batch.remote and batch.state != "collected":
                self._follow(batch.local, batch.remote)
            else:  # not in a batch, or left unanswered by one already read: in a new one
                self._queue(custom_id, body)
        return await asyncio.shield(future)

    def _not_collected(self, remote: str) -> ServingError:
        return ServingError("BatchSubmitted", f"in batch {remote}, not collected"
                            " (serving.wait=false): run the same command again to collect it",
                            transient=False)

    def _queue(self, custom_id: str, body: dict[str, Any]) -> None:
        if custom_id in self._queued:  # a batch may not carry one custom_id twice
            return
        line = json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                           "body": body}, ensure_ascii=False).encode() + b"\n"
        if self._pending and (len(self._pending) >= self.max_requests_per_batch
                              or self._pending_bytes + len(line) > self.max_bytes_per_batch):
            self._flush()
        self._pending.append((custom_id, line))
        self._queued.add(custom_id)
        self._pending_bytes += len(line)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush_timer = asyncio.get_running_loop().call_later(self.flush_after, self._flush)

    def _flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        self._queued.clear()
        self._spawn(self._submit(lines))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- a batch's life -----------------------------------------------------------------------

    async def _submit(self, lines: list[tuple[str, bytes]]) -> None:
        assert self._ledger is not None
        local = uuid.uuid4().hex
        ids = [custom_id for custom_id, _ in lines]
        try:
            self._ledger.begin(local, ids)  # before anything leaves: a kill submits nothing
        except Exception as exc:
            self._fail(ids, ServingError("BatchLedger", f"cannot record a batch in"
                                         f" {self.ledger_path}: {exc}", transient=False))
            return
        try:
            upload = await self._api.files.create(
                file=(f"capflow-{local}.jsonl", b"".join(line for _, line in lines)),
                purpose="batch")
            self._ledger.uploaded(local, upload.id)
            batch = await self._api.batches.create(
                input_file_id=upload.id, endpoint=ENDPOINT,
                completion_window=self.completion_window,
                metadata={"capflow_batch": local})
        except Exception as exc:  # the batch was not created: its rows fail, a rerun retries
            self._ledger.dropped(local)
            self._fail(ids, _api_error(exc, "submitting a batch"))
            return
        self._ledger.submitted(local, batch.id)
        log.info("batch %s submitted: %d requests (%s)", batch.id, len(ids), local)
        self._follow(local, batch.id)

    def _follow(self, local: str, remote: str) -> None:
        if local in self._polling:
            return
        self._polling.add(local)
        self._spawn(self._poll(local, remote, once=not self.wait))

    def _ids_of(self, local: str) -> list[str]:
        assert self._ledger is not None
        return [line.custom_id for line in self._ledger.lines_of(local)]

    async def _poll(self, local: str, remote: str, once: bool = False) -> None:
        """Look at the batch until it ends, then collect it; ``once``: collect it if it has
        ended, else fail its waiting rows as not collected (``wait=false``)."""
        began = time.monotonic()
        while True:
            try:
                batch = await self._api.batches.retrieve(remote)
            except Exception as exc:
                if getattr(exc, "status_code", None) == 404:  # the server has no such batch
                    self._lost(local, remote)
                    return
                log.info("batch %s: cannot look at it (%s); trying again", remote,
                         clean_message(str(exc), 200))
                await asyncio.sleep(self.poll_interval)
                continue
            counts = batch.request_counts
            done = f"{counts.completed}/{counts.total} done, {counts.failed} failed" \
                if counts else "no counts yet"
            deadline = time.strftime("%Y-%m-%d %H:%M", time.localtime(batch.expires_at)) \
                if batch.expires_at else "?"
            log.info("batch %s: %s, %s, %.0fs, deadline %s", remote, batch.status, done,
                     time.monotonic() - began, deadline)
            if batch.status in FINAL:
                break
            if once:
                self._not_ready.add(local)
                self._polling.discard(local)
                waiting = [c for c in self._ids_of(local) if c in self._waiting]
                self._fail(waiting, self._not_collected(remote))
                return
            await asyncio.sleep(self.poll_interval)
        for attempt in range(10):  # the results must be read: a failed download is tried again
            try:
                await self._collect(local, batch)
                return
            except Exception as exc:
                log.info("batch %s: cannot read its results (%s); trying again", remote,
                         clean_message(str(exc), 200))
                await asyncio.sleep(self.poll_interval * (attempt + 1))
        self._polling.discard(local)
        waiting = [c for c in self._ids_of(local) if c in self._waiting]
        self._fail(waiting, ServingError("BatchUnreadable", f"the results of batch {remote}"
                                         " could not be read: run the same command again",
                                         transient=False))

    def _lost(self, local: str, remote: str) -> None:
        """A batch the server does not know (deleted, another account): its waiting rows fail
        and the ledger forgets it, so that a rerun submits those lines anew."""
        assert self._ledger is not None
        waiting = [c for c in self._ids_of(local) if c in self._waiting]
        self._ledger.dropped(local)
        self._polling.discard(local)
        self._fail(waiting, ServingError(
            "BatchLost", f"the server does not know batch {remote}: run the same command again"
            " to submit its requests anew", transient=False))

    async def _collect(self, local: str, batch: Any) -> None:
        assert self._ledger is not None
        answered: set[str] = set()
        if batch.output_file_id:
            for record in await self._lines(batch.output_file_id):
                custom_id = record.get("custom_id")
                response = record.get("response") or {}
                if not isinstance(custom_id, str) or response.get("status_code") != 200:
                    continue
                answered.add(custom_id)
                self._ledger.done(custom_id, json.dumps(response.get("body")))
                self._answer(custom_id, response.get("body"))
        errors: dict[str, ServingError] = {}
        if batch.error_file_id:
            for record in await self._lines(batch.error_file_id):
                custom_id = record.get("custom_id")
                if isinstance(custom_id, str) and custom_id not in answered:
                    errors[custom_id] = _line_error(record)
        for line in self._ledger.lines_of(local):
            if line.custom_id in answered or line.state == "done":
                continue
            error = errors.get(line.custom_id) or ServingError(
                "BatchUnanswered", f"batch {batch.id} ended {batch.status} without answering"
                " this request", transient=True)
            await self._again_or_fail(line.custom_id, line.attempts, error, batch)
        self._ledger.collected(local)
        self._polling.discard(local)

    async def _again_or_fail(self, custom_id: str, attempts: int, error: ServingError,
                             batch: Any) -> None:
        assert self._ledger is not None
        if attempts < self.max_batch_attempts:
            try:
                body = await self._body_of(batch.input_file_id, custom_id)
            except Exception:  # its input file cannot be read back: the row fails below
                body = None
            if body is not None:
                # Rows asking for this line from now on wait for its new batch.
                self._waiting.setdefault(custom_id,
                                         asyncio.get_running_loop().create_future())
                self._queue(custom_id, body)
                return
        self._ledger.failed(custom_id, str(error))
        self._fail([custom_id], ServingError(error.kind, f"{error} (after {attempts}"
                                             f" batches)", transient=False))

    async def _body_of(self, input_file: str | None, custom_id: str) -> dict[str, Any] | None:
        """A line's request body, read back from its batch's input file (cached per file)."""
        if not input_file:
            return None
        cache = self._inputs
        if input_file not in cache:
            cache[input_file] = {r.get("custom_id"): r.get("body")
                                 for r in await self._lines(input_file)}
        body = cache[input_file].get(custom_id)
        return body if isinstance(body, dict) else None

    async def _lines(self, file_id: str) -> list[dict[str, Any]]:
        content = await self._api.files.content(file_id)
        out = []
        for text in content.text.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(text)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def _answer(self, custom_id: str, body: Any) -> None:
        future = self._waiting.pop(custom_id, None)
        if future is None or future.done():
            return
        try:
            future.set_result(parse_completion(body))
        except ServingError as exc:
            future.set_exception(exc)

    def _fail(self, custom_ids: list[str], error: ServingError) -> None:
        for custom_id in custom_ids:
            future = self._waiting.pop(custom_id, None)
            if future is not None and not future.done():
                future.set_exception(error)


def _line_error(record: dict[str, Any]) -> ServingError:
    """A line of a batch's error file as the error its row would get live."""
    response = record.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    error = record.get("error") or {}
    fallback = error.get("message") if isinstance(error, dict) else None
    message = server_message(body, fallback or "the batch answered this request with an error")
    if isinstance(status, int) and status >= 400:
        return status_error(status, message)
    return ServingError("BatchLineFailed", clean_message(message, 300), transient=True)


def _api_error(exc: Exception, doing: str) -> ServingError:
    status = getattr(exc, "status_code", None)
    message = clean_message(f"{doing}: {exc}", 300)
    if isinstance(status, int):
        return ServingError("BatchRefused", f"{message} (status {status})", transient=False)
    return ServingError("BatchUnreachable", message, transient=False)
