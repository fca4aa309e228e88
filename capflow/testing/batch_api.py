"""OpenAI's Batch API on the fake OpenAI server: ``/v1/files`` takes a JSON Lines file of
requests and gives results back, ``/v1/batches`` runs, lists and cancels batches.

A batch answers each line's body as the live chat-completions endpoint would (the same caption
for the same body), on the server's own event loop, ``batch_latency`` seconds after it is
created. Faults make single lines fail (chosen by custom_id, so a resubmitted line can succeed)
or whole batches expire or fail; the records let a test check that no line was answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from capflow.testing.api_errors import ApiError
from capflow.testing.chat_reply import answer_text, completion
from capflow.testing.chat_request import RecordedRequest, read_body

CHAT_ENDPOINT = "/v1/chat/completions"
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
#: The server settings ``POST /_batch_faults`` may change (attributes of the server).
BATCH_SETTINGS = ("batch_latency", "batch_line_latency", "batch_error_rate",
                  "batch_error_attempts", "batch_seed", "batch_expire_after", "expire_next",
                  "fail_next")
_WINDOW_SECONDS = 24 * 3600
_SERVER_ERROR = ("The server had an error while processing your request. Sorry about that! "
                 "You can retry your request.")
_UNRUN = {
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request executed."),
}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BatchHost(Protocol):
    """The server's batch settings, read when a batch is created or run (so a test may change
    them between batches)."""

    models: list[str] | None
    batch_latency: float
    batch_line_latency: float
    batch_error_rate: float
    batch_error_attempts: int
    batch_seed: int
    batch_expire_after: int
    expire_next: int
    fail_next: int

    async def read_chat_body(self, body: Any, rec: RecordedRequest) -> str:
        """Read a chat body into ``rec`` as the live endpoint does; returns the model."""
        ...


@dataclass(frozen=True)
class SubmittedBatch:
    """A batch as submitted: its id, its input file and its lines' custom_ids, in file order."""

    id: str
    input_file_id: str
    custom_ids: tuple[str, ...]


@dataclass
class StoredFile:
    """An uploaded file, or a batch's output or error file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict[str, Any]:
        """The Files API's ``file`` object."""
        return {"id": self.id, "object": "file", "bytes": len(self.data),
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "status_details": None,
                "expires_at": None}


@dataclass
class _Batch:
    id: str
    input_file_id: str
    lines: list[dict[str, Any]]
    metadata: dict[str, str] | None
    fate: str | None  # "expire" or "fail", drawn from expire_next/fail_next at creation
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, ...
    counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    tokens: list[int] = field(default_factory=lambda: [0, 0])  # input, output
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def to_json(self) -> dict[str, Any]:
        """The Batch API's ``batch`` object."""
        stamps = ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at")
        models = {line["body"].get("model") for line in self.lines}
        input_tokens, output_tokens = self.tokens
        return {
            "id": self.id, "object": "batch", "endpoint": CHAT_ENDPOINT,
            "model": models.pop() if len(models) == 1 else None,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id, "completion_window": "24h",
            "status": self.status, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "created_at": self.created_at,
            "expires_at": self.created_at + _WINDOW_SECONDS,
            **{name: self.times.get(name) for name in stamps},
            "request_counts": dict(self.counts),
            "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens},
            "metadata": self.metadata,
        }


def parse_batch_file(data: bytes) -> list[dict[str, Any]]:
    """The request lines of a batch input file (blank lines skipped); a 400 ``ApiError``
    naming the first line that is not ``{"custom_id", "method": "POST", "url", "body"}``."""
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            raise ApiError(400, f"Invalid batch file: line {number} is not valid JSON.",
                           "invalid_json_line") from None
        problem = (
            "not a JSON object" if not isinstance(line, dict)
            else "'custom_id' must be a string" if not isinstance(line.get("custom_id"), str)
            else "'method' must be 'POST'" if line.get("method") != "POST"
            else "'url' must be a string" if not isinstance(line.get("url"), str)
            else "'body' must be an object" if not isinstance(line.get("body"), dict)
            else None
        )
        if problem:
            raise ApiError(400, f"Invalid batch file: line {number}: {problem}.")
        lines.append(line)
    return lines


def _error_body(status: int, message: str, code: str | None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _new_id(prefix: str) -> str:
    # Random, not counted: a client's records of ids must not match a restarted server's.
    return f"{prefix}{uuid.uuid4().hex}"


class BatchApi:
    """The Files and Batch endpoints, their stored files and batches, and the records a test
    reads (:meth:`submitted`, :meth:`answered`).

    Files and batches are touched only on the server's event loop; the records are kept under
    a lock since a test's thread reads them.
    """

    def __init__(self, host: BatchHost, check_auth: Callable[[web.Request], None],
                 next_completion_id: Callable[[], int]) -> None:
        self._host = host
        self._check_auth = check_auth
        self._next_completion_id = next_completion_id
        self._files: dict[str, StoredFile] = {}
        self._batches: dict[str, _Batch] = {}  # in creation order
        self._runs: set[asyncio.Task[None]] = set()
        self._lock = threading.Lock()
        self.reset()

    # -- records (safe from any thread) --------------------------------------

    def reset(self) -> None:
        """Forget the records and the lines' attempt counts (stored files and batches stay)."""
        with self._lock:
            self._submitted: list[SubmittedBatch] = []
            self._answered: Counter[str] = Counter()
            self._attempts: Counter[str] = Counter()

    def submitted(self) -> list[SubmittedBatch]:
        """Every batch created, in creation order (failed ones included)."""
        with self._lock:
            return list(self._submitted)

    def answered(self) -> dict[str, int]:
        """``{custom_id: times answered with status 200}``, over all batches."""
        with self._lock:
            return dict(self._answered)

    # -- routes ------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """Add the Files and Batch routes (with and without ``/v1``) and ``POST
        /_batch_faults``; batches still running are cancelled when the app is cleaned up."""
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/files", self._api(self._create_file))
            app.router.add_get(f"{prefix}/files/{{file_id}}", self._api(self._get_file))
            app.router.add_delete(f"{prefix}/files/{{file_id}}", self._api(self._delete_file))
            app.router.add_get(f"{prefix}/files/{{file_id}}/content",
                               self._api(self._file_content))
            app.router.add_post(f"{prefix}/batches", self._api(self._create_batch))
            app.router.add_get(f"{prefix}/batches", self._api(self._list_batches))
            app.router.add_get(f"{prefix}/batches/{{batch_id}}", self._api(self._get_batch))
            app.router.add_post(f"{prefix}/batches/{{batch_id}}/cancel",
                                self._api(self._cancel_batch))
        app.router.add_post("/_batch_faults", self._set_faults)
        app.on_cleanup.append(self._stop_runs)

    def _api(self, handler: _Handler) -> _Handler:
        """``handler`` behind the API key check, its refusals sent as OpenAI errors."""
        async def checked(request: web.Request) -> web.StreamResponse:
            try:
                self._check_auth(request)
                return await handler(request)
            except ApiError as err:
                return err.response()
        return checked

    async def _set_faults(self, request: web.Request) -> web.Response:
        """``{"expire_next": 1, ...}``: set some of :data:`BATCH_SETTINGS` from another
        process."""
        body = await request.json()
        unknown = set(body) - set(BATCH_SETTINGS) if isinstance(body, dict) else {"?"}
        if unknown:
            return web.json_response({"error": f"unknown settings: {sorted(unknown)}"},
                                     status=400)
        for name, value in body.items():
            setattr(self._host, name, value)
        return web.json_response({"ok": True})

    async def _stop_runs(self, app: web.Application) -> None:
        for run in list(self._runs):
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)

    # -- files ---------------------------------------------------------------------

    def _store(self, filename: str, purpose: str, data: bytes) -> StoredFile:
        stored = StoredFile(_new_id("file-"), filename, purpose, data)
        self._files[stored.id] = stored
        return stored

    def _file(self, request: web.Request) -> StoredFile:
        file_id = request.match_info["file_id"]
        if file_id not in self._files:
            raise ApiError(404, f"No such File object: {file_id}")
        return self._files[file_id]

    async def _create_file(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField):
            raise ApiError(400, "Missing required parameter: 'file'.")
        if purpose not in FILE_PURPOSES:
            raise ApiError(400, f"Invalid value for 'purpose': {purpose!r}.")
        data = upload.file.read()
        if purpose == "batch":
            parse_batch_file(data)  # refuse a malformed file now, as OpenAI does
        return web.json_response(self._store(upload.filename or "upload", str(purpose),
                                             data).to_json())

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._file(request).to_json())

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        stored = self._files.pop(self._file(request).id)
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._file(request).data,
                            content_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------

    def _batch(self, request: web.Request) -> _Batch:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self._batches:
            raise ApiError(404, f"No such Batch object: {batch_id}")
        return self._batches[batch_id]

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        file_id, metadata = body.get("input_file_id"), body.get("metadata")
        if not isinstance(file_id, str):
            raise ApiError(400, "Missing required parameter: 'input_file_id'.")
        if body.get("endpoint") != CHAT_ENDPOINT:
            raise ApiError(400, f"Invalid value for 'endpoint': this server batches only "
                                f"{CHAT_ENDPOINT}.")
        if body.get("completion_window") != "24h":
            raise ApiError(400, "Invalid value for 'completion_window': only '24h' is "
                                "supported.")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= 16
                and all(isinstance(v, str) for v in metadata.values())):
            raise ApiError(400, "Invalid 'metadata': expected up to 16 string values.")
        if file_id not in self._files:
            raise ApiError(404, f"No such File object: {file_id}")
        stored = self._files[file_id]
        if stored.purpose != "batch":
            raise ApiError(400, f"File {file_id} was not uploaded with purpose 'batch'.")
        batch = _Batch(_new_id("batch_"), file_id, parse_batch_file(stored.data), metadata,
                       self._draw_fate())
        self._batches[batch.id] = batch
        with self._lock:
            self._submitted.append(SubmittedBatch(
                batch.id, file_id, tuple(line["custom_id"] for line in batch.lines)))
        run = asyncio.create_task(self._run(batch))
        self._runs.add(run)  # a reference, so the task is not collected while it runs
        run.add_done_callback(self._runs.discard)
        return web.json_response(batch.to_json())

    def _draw_fate(self) -> str | None:
        """Take the batch's share of ``fail_next`` / ``expire_next`` (failures first)."""
        host = self._host
        if host.fail_next > 0:
            host.fail_next -= 1
            return "fail"
        if host.expire_next > 0:
            host.expire_next -= 1
            return "expire"
        return None

    async def _get_batch(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._batch(request).to_json())

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        """Newest first, ``limit`` (1 to 100, default 20) a page, from after ``after``."""
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise ApiError(400, "Invalid 'limit': expected an integer from 1 to 100.")
        newest = list(reversed(self._batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [batch.id for batch in newest]
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no batch {after}.")
            newest = newest[ids.index(after) + 1:]
        page = newest[:limit]
        return web.json_response({
            "object": "list", "data": [batch.to_json() for batch in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(newest) > limit,
        })

    async def _cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request)
        if batch.status in ("validating", "in_progress"):
            batch.status = "cancelling"
            batch.times["cancelling_at"] = int(time.time())
            batch.cancel.set()  # the run stops before its next line
        elif batch.status != "cancelling":
            raise ApiError(409, f"Cannot cancel a batch with status '{batch.status}'.")
        return web.json_response(batch.to_json())

    # -- running a batch ---------------------------------------------------------

    async def _run(self, batch: _Batch) -> None:
        """Validate, wait ``batch_latency``, answer the lines one by one, then write the
        output and error files."""
        host = self._host
        if not batch.cancel.is_set():  # else cancelled while validating: nothing runs
            batch.errors = self._validation_errors(batch)
            if batch.errors:
                batch.status = "failed"
                batch.times["failed_at"] = int(time.time())
                return
            batch.status = "in_progress"
            batch.times["in_progress_at"] = int(time.time())
        batch.counts["total"] = len(batch.lines)
        await self._pause(batch, host.batch_latency)
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        done = 0
        for line in batch.lines:
            if batch.fate == "expire" and done >= host.batch_expire_after:
                break
            await self._pause(batch, host.batch_line_latency)
            if batch.cancel.is_set():
                break
            result = await self._answer_line(batch, line)
            (outputs if result["response"]["status_code"] == 200 else errors).append(result)
            done += 1
        end = ("cancelled" if batch.cancel.is_set()
               else "expired" if batch.fate == "expire" else "completed")
        if end != "completed":
            code, message = _UNRUN[end]
            errors += [{"id": _new_id("batch_req_"), "custom_id": line["custom_id"],
                        "response": None, "error": {"code": code, "message": message}}
                       for line in batch.lines[done:]]
        else:
            batch.status = "finalizing"
            batch.times["finalizing_at"] = int(time.time())
        # As OpenAI does, a file only when there is something to put in it.
        if outputs:
            batch.output_file_id = self._results_file(batch, "output", outputs)
        if errors:
            batch.error_file_id = self._results_file(batch, "error", errors)
        batch.status = end
        batch.times[f"{end}_at"] = int(time.time())

    def _validation_errors(self, batch: _Batch) -> list[dict[str, Any]] | None:
        """What makes the whole batch fail, as the ``errors`` list's items; None if nothing."""
        if batch.fate == "fail":
            return [{"code": "token_limit_exceeded", "line": None, "param": None,
                     "message": "Enqueued token limit reached. Please try submitting a "
                                "smaller batch, or wait for your existing batches to finish."}]
        if not batch.lines:
            return [{"code": "empty_file", "line": None, "param": None,
                     "message": "The input file is empty."}]
        found: list[dict[str, Any]] = []
        seen: set[str] = set()
        models = {line["body"].get("model") for line in batch.lines}
        for number, line in enumerate(batch.lines, 1):
            if line["custom_id"] in seen:
                found.append({"code": "duplicate_custom_id", "line": number,
                              "param": "custom_id",
                              "message": "The custom_id for this request is a duplicate of "
                                         "another request. The custom_id parameter must be "
                                         "unique for each request in a batch."})
            seen.add(line["custom_id"])
            if line["url"] != CHAT_ENDPOINT:
                found.append({"code": "url_mismatch", "line": number, "param": "url",
                              "message": "The provided URL does not match the batch endpoint "
                                         f"{CHAT_ENDPOINT}."})
        if len(models) > 1:
            found.append({"code": "model_mismatch", "line": None, "param": "body.model",
                          "message": "All requests in a batch must use the same model."})
        return found or None

    async def _pause(self, batch: _Batch, seconds: float) -> None:
        """Wait ``seconds``, or until the batch is cancelled."""
        if seconds > 0 and not batch.cancel.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(batch.cancel.wait(), seconds)

    async def _answer_line(self, batch: _Batch, line: dict[str, Any]) -> dict[str, Any]:
        """One line's result: the live endpoint's answer to its body, or an injected error."""
        custom_id = line["custom_id"]
        with self._lock:
            attempt = self._attempts[custom_id]
            self._attempts[custom_id] += 1
        if self._fails(custom_id, attempt):
            status, body = 500, _error_body(500, _SERVER_ERROR, None)
        else:
            status, body = await self._chat(line["body"])
        if status == 200:
            with self._lock:
                self._answered[custom_id] += 1
            batch.counts["completed"] += 1
            batch.tokens[0] += body["usage"]["prompt_tokens"]
            batch.tokens[1] += body["usage"]["completion_tokens"]
        else:
            batch.counts["failed"] += 1
        # A failed request keeps its response (status and error body) and a null "error", as
        # OpenAI's error files do; "error" is for requests that never ran.
        return {"id": _new_id("batch_req_"), "custom_id": custom_id,
                "response": {"status_code": status, "request_id": _new_id("req_"),
                             "body": body},
                "error": None}

    def _fails(self, custom_id: str, attempt: int) -> bool:
        """Whether ``batch_error_rate`` picks this line for an error on this attempt: the pick
        depends on the seed and custom_id alone, and holds for ``batch_error_attempts``."""
        host = self._host
        if host.batch_error_rate <= 0 or attempt >= host.batch_error_attempts:
            return False
        digest = hashlib.blake2b(f"{host.batch_seed}\0{custom_id}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "big") / 2**64 < host.batch_error_rate

    async def _chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Status and body the live chat-completions endpoint gives ``body`` (no latency,
        live faults or outage: those are the live endpoint's)."""
        rec = RecordedRequest()
        try:
            model = await self._host.read_chat_body(body, rec)
        except ApiError as err:
            return err.status, _error_body(err.status, err.message, err.code)
        return 200, completion(model, rec, answer_text(rec), self._next_completion_id())

    def _results_file(self, batch: _Batch, kind: str, results: list[dict[str, Any]]) -> str:
        data = "".join(json.dumps(result) + "\n" for result in results).encode()
        return self._store(f"{batch.id}_{kind}.jsonl", "batch_output", data).id
