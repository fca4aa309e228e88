"""A small, fast, real HTTP server speaking the OpenAI chat-completions protocol.

Answers are deterministic captions derived from the images in the request (see
:func:`describe_image`), so tests can compute the expected caption themselves.
Run in-process (``with FakeOpenAIServer() as server: ...``) or as a process
(``python -m capflow.testing.server --port 0``). It only binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web
from PIL import Image, ImageStat

from capflow.testing.fake_answers import asked_schema, fake_object
from capflow.testing.faults import (
    FAULT_KINDS,
    FaultConfig,
    FaultInjector,
    add_fault_arguments,
    apply_fault,
    config_from_args,
    error_response,
)

__all__ = ["DEFAULT_MODEL", "FakeOpenAIServer", "FaultConfig", "RecordedRequest", "describe_image",
           "fake_object"]

HOST = "127.0.0.1"
DEFAULT_MODEL = "capflow-test-model"
TOKENS_PER_IMAGE = 85
_INLINE_DECODE_LIMIT = 64 * 1024  # bigger images are decoded off the event loop
# Benchmarks often resend the same few images; decoding dominates the server's CPU time.
_DESCRIPTIONS: dict[bytes, str] = {}
_DESCRIPTIONS_MAX = 4096


def describe_image(data: bytes) -> str:
    """Return ``"{W}x{H} #rrggbb"``: size and mean RGB colour of an image.

    Each channel mean is rounded with :func:`round` (exact halves go to even).

    Raises ``ValueError("Invalid image")`` if Pillow cannot decode ``data``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            mean = ImageStat.Stat(img.convert("RGB")).mean
    except Exception as exc:  # Pillow raises many unrelated types on bad input
        raise ValueError("Invalid image") from exc
    r, g, b = (round(c) for c in mean)
    return f"{width}x{height} #{r:02x}{g:02x}{b:02x}"


async def _describe_url(url: str) -> str:
    """Describe an ``image_url``; raises ValueError (incl. binascii.Error) if invalid."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise ValueError("Invalid image")
        is_b64 = header.endswith(";base64")
        data = base64.b64decode(payload) if is_b64 else unquote_to_bytes(payload)
        key = hashlib.blake2b(data, digest_size=16).digest()
        if (text := _DESCRIPTIONS.get(key)) is None:
            if len(data) > _INLINE_DECODE_LIMIT:
                # Pillow releases the GIL while decoding, so big images decode in parallel.
                text = await asyncio.to_thread(describe_image, data)
            else:
                text = describe_image(data)
            if len(_DESCRIPTIONS) >= _DESCRIPTIONS_MAX:
                _DESCRIPTIONS.clear()
            _DESCRIPTIONS[key] = text
        return text
    if url.startswith(("http://", "https://")):
        return f"url {url}"
    raise ValueError("Invalid image")


@dataclass
class RecordedRequest:
    """What the server saw of one chat-completions request, and how it answered.

    ``status`` is 0 when the connection was reset, 499 when the client went away.
    """

    model: str | None = None
    system: str | None = None
    texts: list[tuple[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    fault: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    received_at: float = 0.0  # time.monotonic() when the request arrived


async def _stream(request: web.Request, completion: dict[str, Any]) -> web.StreamResponse:
    """Send ``completion`` as server-sent events: one chunk per word, then usage."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {k: completion[k] for k in ("id", "created", "model")} | {
        "object": "chat.completion.chunk"
    }
    for choice in completion["choices"]:
        words = choice["message"]["content"].split(" ")
        for n, word in enumerate(words):
            delta = {"content": word if n == 0 else " " + word}
            chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
        await response.write(f"data: {json.dumps(base | {'choices': [end]})}\n\n".encode())
    usage = base | {"choices": [], "usage": completion["usage"]}
    await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


class _ApiError(Exception):
    """Raised inside handlers; becomes an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.code, headers=self.headers)


def _parse_messages(messages: list[Any], rec: RecordedRequest) -> list[str]:
    """Fill ``rec.system``/``rec.texts``; return image URLs in order."""
    system: list[str] = []
    urls: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _ApiError(400, f"Invalid messages[{i}]: expected an object with a 'role'.")
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            parts: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        elif content is None:
            parts = []
        else:
            raise _ApiError(400, f"Invalid type for messages[{i}].content.")
        for part in parts:
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype == "text" and isinstance(part.get("text"), str):
                if role in ("system", "developer"):
                    system.append(part["text"])
                else:
                    rec.texts.append((role, part["text"]))
            elif ptype == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise _ApiError(400, f"Invalid image_url in messages[{i}].")
                urls.append(url)
            elif not isinstance(part, dict):
                raise _ApiError(400, f"Invalid content part in messages[{i}].")
    rec.system = "\n".join(system) if system else None
    return urls


class FakeOpenAIServer:
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

    ``latency``, ``api_key`` and ``failure`` are plain attributes and may be changed while
    running (``POST /_failure`` changes ``failure`` from another process).
    """

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
    ) -> None:
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
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._in_flight = 0
        self.reset()

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
        with self._lock:
            return list(self._records)

    def stats(self) -> dict[str, Any]:
        """Counters: totals, in-flight/peak, per-status and per-fault counts."""
        with self._lock:
            return {
                "requests_total": self._requests_total,
                "responses_ok": self._responses_ok,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "statuses": {str(k): v for k, v in sorted(self._statuses.items())},
                "faults": {k: self._fault_counts[k] for k in FAULT_KINDS},
            }

    def set_faults(self, seed: int = 0, **rates: float) -> None:
        """Inject faults from now on: ``set_faults(rate_500=0.1, rate_bad_json=0.3)`` (the
        ``FaultConfig`` fields); no rates: none."""
        self.faults = FaultInjector(FaultConfig(seed=seed, **rates))

    def reset(self) -> None:
        """Clear records and counters and restart the fault sequence."""
        with self._lock:
            self._records: list[RecordedRequest] = []
            self._requests_total = self._responses_ok = 0
            self._max_in_flight = self._in_flight
            self._statuses: Counter[int] = Counter()
            self._fault_counts: Counter[str] = Counter()
            self._completion_ids = 0
            self._window: tuple[int, int] = (0, 0)  # (second, requests in it)
            self.faults.reset()

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
        return app

    def _check_auth(self, request: web.Request) -> None:
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("Authorization") != expected:
            raise _ApiError(401, "Incorrect API key provided", "invalid_api_key")

    def _check_rate(self, now: float) -> None:
        """Enforce ``rpm_limit`` per one-second window, as rate-limited APIs do (429)."""
        if not self.rpm_limit:
            return
        second = int(now)
        with self._lock:
            current, count = self._window
            count = count + 1 if second == current else 1
            self._window = (second, count)
        if count > self.rpm_limit / 60:
            raise _ApiError(429, "Rate limit reached for requests", "rate_limit_exceeded",
                            headers={"Retry-After": "1"})

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except _ApiError as err:
            return err.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "capflow"}
                for m in (self.models or [DEFAULT_MODEL])]
        return web.json_response({"object": "list", "data": data})

    async def _stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _log_handler(self, request: web.Request) -> web.Response:
        """``[[received_at, status], ...]`` for every recorded request, in completion order."""
        with self._lock:
            log = [[rec.received_at, rec.status] for rec in self._records]
        return web.json_response(log)

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
        with self._lock:
            self._requests_total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            response = await self._answer(request, rec)
            rec.status = response.status
            return response
        except _ApiError as err:
            rec.status = err.status
            return err.response()
        except asyncio.CancelledError:
            if rec.fault != "reset":  # reset keeps status 0: no HTTP response at all
                rec.status = 499  # client went away (nginx's convention)
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
                self._records.append(rec)
                self._statuses[rec.status] += 1
                if rec.fault:
                    self._fault_counts[rec.fault] += 1
                if rec.status == 200 and rec.fault in (None, "hang"):
                    self._responses_ok += 1

    async def _answer(self, request: web.Request, rec: RecordedRequest) -> web.StreamResponse:
        if self.slots:
            if self._slot_gate is None:
                self._slot_gate = asyncio.Semaphore(self.slots)
            async with self._slot_gate:  # FIFO: requests wait their turn for a slot
                await asyncio.sleep(self.latency)
        elif self.latency > 0:
            await asyncio.sleep(self.latency)
        if self.failure is not None:
            raise _ApiError(self.failure[0], self.failure[1], None)
        self._check_auth(request)
        self._check_rate(rec.received_at)
        try:
            body = await request.json()
        except ValueError:
            raise _ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "The request body must be a JSON object.")
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str):
            raise _ApiError(400, "Missing or invalid 'model': expected a string.")
        rec.model = model
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "Invalid 'messages': expected a non-empty array.")
        rec.stream = bool(body.get("stream"))
        # Everything but the conversation: generation parameters and passthrough fields.
        rec.params = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
        if self.models is not None and model not in self.models:
            raise _ApiError(404, f"The model `{model}` does not exist", "model_not_found")
        urls = _parse_messages(messages, rec)
        try:
            rec.images = [await _describe_url(u) for u in urls]
        except ValueError:
            raise _ApiError(400, "Invalid image") from None

        rec.fault = self.faults.draw()
        injected = await apply_fault(rec.fault, self.faults.config, request)
        if injected is not None:
            return injected
        completion = self._completion(model, rec, empty=rec.fault == "empty_choices")
        if rec.stream:
            return await _stream(request, completion)
        return web.json_response(completion)

    def _completion(self, model: str, rec: RecordedRequest, *, empty: bool) -> dict[str, Any]:
        answer = "; ".join(rec.images) if rec.images else "no image"
        schema = asked_schema(rec.params, rec.system)
        if schema is not None:  # a structured answer: an object of the schema's shape
            answer = json.dumps(fake_object(schema, answer))
            if rec.fault == "bad_json":
                answer = answer[: len(answer) // 2]
        words = sum(len(t.split()) for _, t in rec.texts) + len((rec.system or "").split())
        prompt_tokens = words + TOKENS_PER_IMAGE * len(rec.images)
        completion_tokens = len(answer.split())
        with self._lock:
            self._completion_ids += 1
            n = self._completion_ids
        choice = {"index": 0, "message": {"role": "assistant", "content": answer},
                  "finish_reason": "stop", "logprobs": None}
        return {
            "id": f"chatcmpl-capflow{n:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [] if empty else [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

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

    def start(self) -> FakeOpenAIServer:
        """Serve from a background thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        ready = threading.Event()
        self._startup_error = None
        self._thread = threading.Thread(target=self._thread_main, args=(ready,),
                                        name="capflow-fake-openai", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("fake OpenAI server failed to start") from self._startup_error
        return self

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop_event = asyncio.Event()
        try:
            loop.run_until_complete(self.serve(self._stop_event, ready.set))
        except BaseException as exc:
            self._startup_error = exc
        finally:
            ready.set()  # unblock start() if serve() failed before listening
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._loop = None

    def stop(self) -> None:
        """Stop serving, close connections and join the thread."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        thread.join()
        self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m capflow.testing.server", description=__doc__)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each reply")
    p.add_argument("--api-key-env", metavar="NAME", help="require the API key held in env var NAME")
    p.add_argument("--model", action="extend", nargs="+", default=[], help="accepted model name(s)")
    p.add_argument("--rpm-limit", type=int, help="answer 429 above this many requests a minute,"
                   " counted per one-second window")
    p.add_argument("--slots", type=int, help="answer this many requests at once (each taking"
                   " --latency seconds); the others wait in line")
    p.add_argument("--fail-status", type=int, help="answer every request with this status")
    p.add_argument("--fail-message", default="server failure", help="... and this message")
    add_fault_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: serve until SIGTERM/SIGINT."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    server = FakeOpenAIServer(latency=args.latency, api_key=api_key, models=args.model or None,
                              faults=config_from_args(args), rpm_limit=args.rpm_limit,
                              slots=args.slots,
                              failure=(args.fail_status, args.fail_message)
                              if args.fail_status else None,
                              port=args.port)
    try:
        import uvloop  # optional speed-up

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.serve(stop, lambda: print(f"LISTENING {server.base_url}", flush=True))

    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
