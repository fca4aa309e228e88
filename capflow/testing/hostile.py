"""A loopback HTTP server that misbehaves on purpose, to test clients against hostile servers.

``HostileServer`` is a raw asyncio TCP server on 127.0.0.1 (TLS when given an ``ssl``
context), run in a thread. What it does with each request is chosen by the test, by name::

    with HostileServer() as server:
        server.behave("gzip_bomb")
        ...  # a client sends requests to server.base_url
        server.behave("redirect", status=307, location="https://elsewhere.example/v1")

``BEHAVIOURS`` lists the names; each is a small coroutine below. Requests that ask for a stream
(``"stream": true``) get the streamed (SSE) variant of the answers that have one. The server
counts connections (TLS handshakes included, failed or not) and requests, and keeps the
headers of every request it read (``server.seen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import ssl as _ssl
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
CONTENT = "a red square"
ESCAPES = "\x1b[31mred\x1b[0m \x1b]0;pwned\x07bell\x07 \x9b2Jend"  # CSI, OSC, BEL, 8-bit CSI


@dataclass
class Exchange:
    """One request as the server read it, and the means to answer it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    number: int  # 1 for a connection's first request
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        try:
            return bool(json.loads(self.body).get("stream"))
        except (ValueError, AttributeError):
            return False

    def head(self, status: int = 200, *headers: str, length: int | None = None,
             reason: str = "") -> None:
        """Write a status line and headers (and Content-Length, when given)."""
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Whatever')}", *headers]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, body: bytes, status: int = 200, *headers: str) -> None:
        """A whole answer with a Content-Length."""
        self.head(status, *headers, length=len(body))
        self.writer.write(body)

    def json(self, data: Any, status: int = 200, *headers: str) -> None:
        self.send(json.dumps(data).encode(), status, "Content-Type: application/json", *headers)

    def reset(self) -> None:
        """Abort the connection with a TCP RST."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
            308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized",
            429: "Too Many Requests", 500: "Internal Server Error"}


def completion(content: Any = CONTENT, *, refusal: str | None = None, finish_reason: str = "stop",
               usage: bool = True) -> dict[str, Any]:
    """A chat completion; ``content`` may be a string, a list of parts or None."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if refusal is not None:
        message["refusal"] = refusal
    data: dict[str, Any] = {
        "id": "chatcmpl-hostile", "object": "chat.completion", "model": "hostile-model",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }
    if usage:
        data["usage"] = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    return data


def sse(data: dict[str, Any]) -> bytes:
    """``data`` (a completion) as the server-sent events of a stream, piece by piece."""
    choice = data["choices"][0]
    message = choice["message"]
    base = {"id": data["id"], "object": "chat.completion.chunk", "model": data["model"]}
    events = []
    content = message.get("content")
    pieces = [content[:5], content[5:]] if isinstance(content, str) else [content]
    for piece in pieces:
        if piece:
            events.append({**base, "choices": [{"index": 0, "delta": {"content": piece}}]})
    if message.get("refusal"):
        refusal = message["refusal"]
        for piece in (refusal[:4], refusal[4:]):
            events.append({**base, "choices": [{"index": 0, "delta": {"refusal": piece}}]})
    events.append({**base, "choices": [{"index": 0, "delta": {},
                                        "finish_reason": choice["finish_reason"]}]})
    if "usage" in data:
        events.append({**base, "choices": [], "usage": data["usage"]})
    return b"".join(b"data: %s\n\n" % json.dumps(e).encode() for e in events) + b"data: [DONE]\n\n"


# Behaviours: each answers one request (or does not), with ``ex.params`` from ``behave``.

async def answer(ex: Exchange) -> None:
    """A good answer, shaped by ``content``, ``refusal``, ``finish_reason``, ``usage`` (as
    :func:`completion`) and extra ``headers``, gzipped with ``gzip=True``, its body held
    open after the answer with ``hold=True``; ``body``, when given, is sent as it is, with
    ``status`` (200)."""
    p = ex.params
    headers = list(p.get("headers", ()))
    if "body" in p:
        body = p["body"] if isinstance(p["body"], bytes) else json.dumps(p["body"]).encode()
        ex.send(body, p.get("status", 200), "Content-Type: application/json", *headers)
        return
    data = completion(p.get("content", CONTENT), refusal=p.get("refusal"),
                      finish_reason=p.get("finish_reason", "stop"), usage=p.get("usage", True))
    if ex.stream:
        body, headers = sse(data), ["Content-Type: text/event-stream", *headers]
    else:
        body, headers = json.dumps(data).encode(), ["Content-Type: application/json", *headers]
    if p.get("gzip"):
        body, headers = gzip.compress(body), ["Content-Encoding: gzip", *headers]
    if not p.get("hold"):
        ex.send(body, 200, *headers)
        return
    # hold=True: the answer, chunked, and then the body never ends (a stream's [DONE] is
    # the end of the answer all the same).
    ex.head(200, "Transfer-Encoding: chunked", *headers)
    ex.writer.write(b"%x\r\n%s\r\n" % (len(body), body))
    await asyncio.sleep(3600)


async def error(ex: Exchange) -> None:
    """An OpenAI-style error: ``status`` (500), ``message``, ``code``, extra ``headers``."""
    p = ex.params
    body = {"error": {"message": p.get("message", "it broke"), "type": p.get("type", "error"),
                      "code": p.get("code")}}
    ex.json(body, p.get("status", 500), *p.get("headers", ()))


async def echo_auth(ex: Exchange) -> None:
    """A 401 whose message quotes back the Authorization header the request carried."""
    auth = ex.headers.get("authorization", "")
    ex.json({"error": {"message": f"Incorrect API key provided: {auth}"}}, 401)


async def escapes(ex: Exchange) -> None:
    """An error message full of terminal escape sequences, and a reason phrase with one."""
    body = json.dumps({"error": {"message": ESCAPES}}).encode()
    ex.head(400, "Content-Type: application/json", length=len(body), reason="Bad \x1b[2J")
    ex.writer.write(body)


async def endless(ex: Exchange) -> None:
    """A 200 whose body never ends (chunked, or close-delimited with ``framing="close"``)."""
    block = b" " * 65536
    chunked = ex.params.get("framing", "chunked") == "chunked"
    ex.head(200, "Content-Type: application/json",
            *(["Transfer-Encoding: chunked"] if chunked else ["Connection: close"]))
    piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    while True:
        ex.writer.write(piece)
        await ex.writer.drain()


def _bomb_block() -> bytes:
    """1 MiB of zeros as one byte-aligned deflate block: the same bytes each time (a full
    flush resets the compressor), so a bomb of any size is that block repeated."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    packer.compress(b"\0" * (1 << 20))
    return packer.flush(zlib.Z_FULL_FLUSH)


async def gzip_bomb(ex: Exchange) -> None:
    """``size`` (10 MB) of gzip that inflates about a thousand times (to some 10 GB), chunked
    (its Content-Length, with ``length=True``, would give it away before any inflating)."""
    block = _bomb_block()
    count = ex.params.get("size", 10_000_000) // len(block)
    header = gzip.compress(b"")[:10]  # the gzip member header
    content_type = "text/event-stream" if ex.stream else "application/json"
    chunked = not ex.params.get("length")
    framing = "Transfer-Encoding: chunked" if chunked else \
        f"Content-Length: {len(header) + count * len(block)}"
    ex.head(200, f"Content-Type: {content_type}", "Content-Encoding: gzip", framing)
    for piece in (header, *[block] * count):
        ex.writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        await ex.writer.drain()
    if chunked:
        ex.writer.write(b"0\r\n\r\n")


async def huge_header(ex: Exchange) -> None:
    """A header ``size`` bytes long (1 MB), sent in pieces; ``endless=True``: it never ends."""
    ex.writer.write(b"HTTP/1.1 200 OK\r\nX-Filler: ")
    left = ex.params.get("size", 1_000_000)
    while left > 0 or ex.params.get("endless"):
        ex.writer.write(b"x" * 65536)
        left -= 65536
        await ex.writer.drain()
    body = json.dumps(completion()).encode()
    ex.writer.write(b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


async def many_headers(ex: Exchange) -> None:
    """``count`` (1000) small header fields."""
    fields = [f"X-Field-{n}: {n}" for n in range(ex.params.get("count", 1000))]
    ex.json(completion(), 200, *fields)


async def redirect(ex: Exchange) -> None:
    """A ``status`` (302) to ``location``, carrying a perfectly good completion as its body."""
    location = ex.params.get("location", "https://elsewhere.example/v1/chat/completions")
    ex.json(completion("the redirect's body"), ex.params.get("status", 302),
            f"Location: {location}")


async def drip(ex: Exchange) -> None:
    """A 200 whose body comes one byte every ``interval`` (0.2 s), forever (or as good as:
    its Content-Length is within any sensible size limit, and never reached)."""
    interval = ex.params.get("interval", 0.2)
    ex.head(200, "Content-Type: text/event-stream" if ex.stream else "Content-Type: "
            "application/json", length=100_000)
    while True:
        ex.writer.write(b" ")
        await ex.writer.drain()
        await asyncio.sleep(interval)


async def stale(ex: Exchange) -> None:
    """Keep-alive answers, but a connection answers only its first request: a later request
    on it is met with a clean close (the race a keep-alive timeout makes)."""
    if ex.number > 1:
        ex.writer.close()
        return
    await answer(ex)


async def idle_close(ex: Exchange) -> None:
    """A keep-alive answer, then the connection is closed ``after`` (0.05) s of idleness."""
    await answer(ex)
    await ex.writer.drain()
    await asyncio.sleep(ex.params.get("after", 0.05))
    ex.writer.close()


async def reset(ex: Exchange) -> None:
    """A TCP RST instead of an answer."""
    ex.reset()


async def set_cookie(ex: Exchange) -> None:
    """A good answer that sets a cookie (a client must not send it back)."""
    ex.json(completion(), 200, "Set-Cookie: session=from-the-server; Path=/")


async def models(ex: Exchange) -> None:
    """A ``/models`` list of ``ids`` (one model)."""
    ids = ex.params.get("ids", ["hostile-model"])
    ex.json({"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})


BEHAVIOURS: dict[str, Callable[[Exchange], Awaitable[None]]] = {
    f.__name__: f for f in (answer, error, echo_auth, escapes, endless, gzip_bomb, huge_header,
                            many_headers, redirect, drip, stale, idle_close, reset, set_cookie,
                            models)
}


class HostileServer:
    """The server; a context manager that serves from a background thread.

    :param ssl: a server-side TLS context (e.g. from ``trustme``), for an https server.
    """

    def __init__(self, behaviour: str = "answer", *, ssl: _ssl.SSLContext | None = None,
                 **params: Any) -> None:
        self.ssl = ssl
        self.behave(behaviour, **params)
        self.connections = 0  # accepted, before any TLS handshake
        self.requests = 0
        self.seen: list[dict[str, str]] = []  # headers of every request read
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def behave(self, name: str, **params: Any) -> None:
        """Answer the following requests with behaviour ``name`` and these parameters."""
        if name not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
        self._behaviour, self._params = BEHAVIOURS[name], params

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{HOST}:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path = (lines[0].split(" ") + ["", ""])[:2]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                number += 1
                self.requests += 1
                self.seen.append(headers)
                behaviour = models if path.endswith("/models") and self._behaviour is answer \
                    else self._behaviour
                ex = Exchange(reader, writer, method, path, headers, body, number,
                              dict(self._params))
                await behaviour(ex)
                if writer.is_closing():
                    return
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        self.connections += 1  # called at accept, before any TLS handshake
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=1 << 20), self._handle)

    async def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol, HOST, 0, ssl=self.ssl)
        self.port = server.sockets[0].getsockname()[1]
        self._stop = asyncio.Event()
        ready.set()
        await self._stop.wait()
        server.close()
        handlers = asyncio.all_tasks() - {asyncio.current_task()}
        for task in handlers:  # endless answers end here
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def start(self) -> HostileServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            # A client that refuses the certificate makes the handshake fail: not news here.
            self._loop.set_exception_handler(lambda loop, context: None)
            try:
                self._loop.run_until_complete(self._serve(ready))
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="hostile-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
