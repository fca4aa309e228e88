"""The fake OpenAI server itself: its settings, its routes and how it handles each request.

Reading requests, building answers, describing images, injecting faults and keeping count are
each in a module of their own; this one puts them together behind aiohttp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from capflow.testing.api_errors import ApiError
from capflow.testing.background import BackgroundServer
from capflow.testing.batch_api import BatchApi, SubmittedBatch
from capflow.testing.chat_reply import answer_text, completion, stream
from capflow.testing.chat_request import RecordedRequest, parse_messages, read_body, read_chat
from capflow.testing.faults import FaultConfig, FaultInjector, apply_fault
from capflow.testing.image_descriptions import describe_url
from capflow.testing.request_log import RequestLog

HOST = "127.0.0.1"
DEFAULT_MODEL = "capflow-test-model"


class FakeOpenAIServer(BackgroundServer):
    """OpenAI-compatible fake server; use as a context manager or run via :meth:`serve`.

    Args:
        latency: seconds awaited before every chat-completions reply.
        api_key: if set, require ``Authorization: Bearer <api_key>`` (else 401).
        models: if set, other model names get a 404 ``model_not_found``.
        faults: fault-injection rates; None disables faults.
        rpm_limit: answer 429 (Retry-After: 1) above this many requests a minute, counted per
            one-second window.
        slots: answer at most this many requests at once, each taking ``latency`` seconds;
            the others wait in line (as llama.cpp's server does with ``--parallel``).
        failure: ``(status, message)``: answer every chat request with this error (an outage,
            or a model that cannot do what is asked).
        port: port on 127.0.0.1; 0 picks a free one (see :attr:`port`).
        batch_latency: seconds a batch of the Batch API waits before answering its lines.

    ``latency``, ``api_key`` and ``failure`` are plain attributes and may be changed while
    running (``POST /_failure`` changes ``failure`` from another process).

    The Batch API (``/v1/files``, ``/v1/batches``: see :mod:`capflow.testing.batch_api`) reads
    these plain attributes when a batch is created or run (``POST /_batch_faults`` sets them
    from another process; :meth:`set_batch_faults` sets the faults at once):

    - ``batch_latency``: seconds before a batch answers its first line;
    - ``batch_line_latency``: seconds before each line (so a cancel can land mid-batch);
    - ``batch_error_rate``: fraction of custom_ids answered with a 500 in the error file,
      picked from ``batch_seed`` and the custom_id alone, on each line's first
      ``batch_error_attempts`` runs (so a resubmitted line succeeds);
    - ``fail_next``: the next N batches fail as a whole (``errors``, nothing answered);
    - ``expire_next``: the next N batches expire after answering ``batch_expire_after`` lines,
      the others going to the error file as ``batch_expired``.

    Batches do not meet the live endpoint's ``latency``, ``faults``, ``failure`` or limits, and
    their lines are not in :attr:`requests`.
    """

    thread_name = "capflow-fake-openai"
    description = "fake OpenAI server"

    def __init__(
        self,
        latency: float = 0.0,
        api_key: str | None = None,
        models: list[str] | None = None,
        faults: FaultConfig | None = None,
        rpm_limit: int | None = None,
        *,
        slots: int | None = None,
        failure: tuple[int, str] | None = None,
        port: int = 0,
        batch_latency: float = 0.2,
    ) -> None:
        super().__init__()
        self.latency = latency
        self.api_key = api_key
        self.models = list(models) if models else None
        self.faults = FaultInjector(faults)
        self.rpm_limit = rpm_limit
        self.slots = slots
        self.failure = failure
        self._slot_gate: asyncio.Semaphore | None = None
        self._requested_port = port
        self._port: int | None = None
        self._log = RequestLog()
        self.batch_latency = batch_latency
        self.batch_line_latency = 0.0
        self.batch_error_rate = 0.0
        self.batch_error_attempts = 1
        self.batch_seed = 0
        self.batch_expire_after = 0
        self.expire_next = 0
        self.fail_next = 0
        self._batches = BatchApi(self, self._check_auth, self._log.next_completion_id)

    # -- introspection (safe from any thread) ---------------------------------

    @property
    def port(self) -> int:
        """The bound port (only valid once started)."""
        if self._port is None:
            raise RuntimeError("server is not running")
        return self._port

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI ``base_url``, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of completed chat-completions requests, in completion order."""
        return self._log.records()

    def stats(self) -> dict[str, Any]:
        """Counters: totals, in-flight/peak, per-status and per-fault counts."""
        return self._log.stats()

    def set_faults(self, seed: int = 0, **rates: float) -> None:
        """Inject faults from now on: ``set_faults(rate_500=0.1, rate_bad_json=0.3)`` (the
        ``FaultConfig`` fields); no rates: none."""
        self.faults = FaultInjector(FaultConfig(seed=seed, **rates))

    @property
    def batches_submitted(self) -> list[SubmittedBatch]:
        """Every batch created through the Batch API, in creation order: its id, input file
        and its lines' custom_ids."""
        return self._batches.submitted()

    @property
    def batch_lines_answered(self) -> dict[str, int]:
        """``{custom_id: times a batch answered it with status 200}``, over all batches."""
        return self._batches.answered()

    def set_batch_faults(self, error_rate: float = 0.0, *, attempts: int = 1, seed: int = 0,
                         fail_next: int = 0, expire_next: int = 0,
                         expire_after: int = 0) -> None:
        """Set the Batch API's faults at once (see the class docstring); no arguments: none."""
        if not 0 <= error_rate <= 1:
            raise ValueError("error_rate must be within [0, 1]")
        self.batch_error_rate, self.batch_error_attempts, self.batch_seed = (
            error_rate, attempts, seed)
        self.fail_next, self.expire_next, self.batch_expire_after = (
            fail_next, expire_next, expire_after)

    def reset(self) -> None:
        """Clear records and counters and restart the fault sequence (the Batch API's records
        and its lines' attempt counts too; stored files and batches stay)."""
        self._log.reset()
        self.faults.reset()
        self._batches.reset()

    # -- HTTP handlers -------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application (routes with and without ``/v1``)."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_get(f"{prefix}/models", self._list_models)
        app.router.add_get("/_stats", self._stats_handler)
        app.router.add_get("/_log", self._log_handler)
        app.router.add_post("/_reset", self._reset_handler)
        app.router.add_post("/_failure", self._failure_handler)
        self._batches.add_routes(app)
        return app

    def _check_auth(self, request: web.Request) -> None:
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("Authorization") != expected:
            raise ApiError(401, "Incorrect API key provided", "invalid_api_key")

    def _check_rate(self, now: float) -> None:
        """Enforce ``rpm_limit`` per one-second window, as rate-limited APIs do (429)."""
        if not self.rpm_limit:
            return
        if self._log.in_second(int(now)) > self.rpm_limit / 60:
            raise ApiError(429, "Rate limit reached for requests", "rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except ApiError as err:
            return err.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "capflow"}
                for m in (self.models or [DEFAULT_MODEL])]
        return web.json_response({"object": "list", "data": data})

    async def _stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _log_handler(self, request: web.Request) -> web.Response:
        """``[[received_at, status], ...]`` for every recorded request, in completion order."""
        return web.json_response(self._log.timeline())

    async def _failure_handler(self, request: web.Request) -> web.Response:
        """``{"status": 500, "message": "..."}`` fails every request from now on; ``{}`` ends
        the failure."""
        body = await request.json()
        self.failure = (int(body["status"]), str(body.get("message", "failure"))) if body else None
        return web.json_response({"ok": True})

    async def _reset_handler(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization")
        rec = RecordedRequest(headers={"Authorization": auth} if auth is not None else {})
        rec.received_at = time.monotonic()
        self._log.arrived()
        try:
            response = await self._answer(request, rec)
            rec.status = response.status
            return response
        except ApiError as err:
            rec.status = err.status
            return err.response()
        except asyncio.CancelledError:
            if rec.fault != "reset":  # reset keeps status 0: no HTTP response at all
                rec.status = 499  # client went away (nginx's convention)
            raise
        finally:
            self._log.finished(rec)

    async def read_chat_body(self, body: Any, rec: RecordedRequest) -> str:
        """Read a chat-completions body into ``rec`` (its messages and the description of each
        image), as a live request and a batch line are both read; returns the model.
        ``ApiError`` when the body cannot be answered."""
        model, messages = read_chat(body, rec)
        if self.models is not None and model not in self.models:
            raise ApiError(404, f"The model `{model}` does not exist", "model_not_found")
        urls = parse_messages(messages, rec)
        try:
            rec.images = [await describe_url(u) for u in urls]
        except ValueError:
            raise ApiError(400, "Invalid image") from None
        return model

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        await self._take_time()
        if self.failure is not None:
            raise ApiError(self.failure[0], self.failure[1], None)
        self._check_auth(request)
        self._check_rate(rec.received_at)
        model = await self.read_chat_body(await read_body(request), rec)

        rec.fault = self.faults.draw()
        injected = await apply_fault(rec.fault, self.faults.config, request)
        if injected is not None:
            return injected
        answer = answer_text(rec, cut_short=rec.fault == "bad_json")
        reply = completion(model, rec, answer, self._log.next_completion_id(),
                           empty=rec.fault == "empty_choices")
        if rec.stream:
            return await stream(request, reply)
        return web.json_response(reply)

    async def _take_time(self) -> None:
        """Wait ``latency``, in line for one of the ``slots`` when they are limited."""
        if self.slots:
            if self._slot_gate is None:
                self._slot_gate = asyncio.Semaphore(self.slots)
            async with self._slot_gate:  # FIFO: requests wait their turn for a slot
                await asyncio.sleep(self.latency)
        elif self.latency > 0:
            await asyncio.sleep(self.latency)

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Listen on 127.0.0.1 until ``stop`` is set, calling ``on_ready`` once listening."""
        # handler_cancellation frees in_flight when a client gives up on a hang.
        runner = web.AppRunner(self.make_app(), access_log=None, handler_cancellation=True,
                               shutdown_timeout=0.5)
        await runner.setup()
        try:
            site = web.TCPSite(runner, HOST, self._requested_port, backlog=4096)
            await site.start()
            self._port = runner.addresses[0][1]
            if on_ready is not None:
                on_ready()
            await stop.wait()
        finally:
            await runner.cleanup()
            self._port = None
