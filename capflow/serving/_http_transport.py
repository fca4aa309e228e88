"""capflow's own HTTP/1.1 client for the chat-completions protocol (``serving.transport=http``).

At hundreds of requests in flight, the client's own CPU per request is what bounds throughput
on a small machine. This client does per request only what the protocol needs: one write of
the request, and httptools (llhttp, the parser behind Node.js and uvicorn) to read the answer,
on a pool of keep-alive connections as large as the requests in flight. It also imports in a
few milliseconds, against a fifth of a second for a general-purpose client.

It speaks plain HTTP/1.1 and TLS with the system's certificates. It does not go through HTTP
proxies; ``serving.transport=sdk`` (the official SDK) is there for set-ups that need one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools

from capflow import __version__
from capflow.errors import ConfigError, ServingError
from capflow.request import Response
from capflow.serving._protocol import StreamedAnswer, decode_answer

log = logging.getLogger("capflow")

_END = object()  # the end of a streamed body


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.waiter: asyncio.Future[None] | None = None
        self.stream: asyncio.Queue[Any] | None = None
        self.status = 0
        self.reason = b""
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []
        self.complete = False
        self.got_data = False
        self.keep_alive = False
        self.closed_cleanly = False
        self.timer: asyncio.TimerHandle | None = None

    def begin(self, loop: asyncio.AbstractEventLoop, stream: bool) -> asyncio.Future[None]:
        """Get ready for the next answer; the future is done when it is in (for a stream:
        when its headers are), or fails with a ``ServingError``."""
        self.status, self.reason, self.headers, self.chunks = 0, b"", {}, []
        self.complete = self.got_data = self.keep_alive = False
        self.stream = asyncio.Queue() if stream else None
        self.waiter = loop.create_future()
        return self.waiter

    def fail(self, error: ServingError) -> None:
        """End the exchange with ``error`` and drop the connection."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.stream is not None:
            self.stream.put_nowait(error)
        if self.transport is not None:
            self.transport.abort()
        self.lost = True

    def time_out(self, seconds: float) -> None:
        self.fail(ServingError("Timeout", f"no answer within {seconds:g} s", transient=True))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection cannot be trusted
            self.fail(ServingError("BadResponse", "unexpected data from the server",
                                   transient=True))
            return
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ServingError("BadResponse", f"malformed HTTP response: {exc}",
                                   transient=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed_cleanly = exc is None
        if self.waiter is None or self.complete:
            return
        if (exc is None and self.status and b"content-length" not in self.headers
                and not self._chunked()):
            self.on_message_complete()  # a body that ends where the connection does
            return
        reason = f": {exc}" if exc else ""
        self.fail(ServingError("ConnectionError",
                               f"the server closed the connection mid-answer{reason}",
                               transient=True))

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this connection
            self.keep_alive = False
            self.lost = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self._interim():
            return
        if self.stream is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._interim():
            return
        if self.stream is not None:
            self.stream.put_nowait(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self._interim():  # 100 Continue, 103 Early Hints: the answer is still to come
            self.status, self.reason, self.headers = 0, b"", {}
            return
        self.keep_alive = self.parser.should_keep_alive()  # only known until the next message
        self.complete = True
        if self.stream is not None:
            self.stream.put_nowait(_END)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _interim(self) -> bool:
        return 100 <= self.status < 200 and self.status != 101

    def _chunked(self) -> bool:
        return b"chunked" in self.headers.get(b"transfer-encoding", b"").lower()

    def body(self) -> bytes:
        data = b"".join(self.chunks)
        unpack = _decompressor(self.headers.get(b"content-encoding", b""))
        if unpack is not None:
            try:
                data = unpack.decompress(data) + unpack.flush()
            except zlib.error as exc:
                raise ServingError("BadResponse", f"cannot decompress the answer: {exc}",
                                   transient=True) from None
        return data


class HttpTransport:
    """Chat completions over capflow's own pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, api_url: str, key: str | None, timeout: float, connections: int) -> None:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"serving.api_url must be an http(s) URL, not {api_url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"serving.api_url has a bad port: {api_url!r}") from None
        self.timeout = timeout
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.ssl: Any = None
        if parts.scheme == "https":
            import ssl  # only TLS connections pay for it

            self.ssl = ssl.create_default_context()
        path = parts.path.rstrip("/")
        common = (
            f"Host: {parts.netloc.rsplit('@', 1)[-1]}\r\n"
            f"User-Agent: capflow/{__version__}\r\n"
            "Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "")
        )
        self._chat_head = (f"POST {path}/chat/completions HTTP/1.1\r\n{common}"
                           "Content-Type: application/json\r\nContent-Length: ").encode()
        self._models_head = f"GET {path}/models HTTP/1.1\r\n{common}\r\n".encode()
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        _warn_about_proxies(self.host, parts.scheme)

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        conn = await self._exchange(lambda: [self._models_head], stream=False)
        data = self._finish(conn)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ServingError("BadResponse", "/models did not answer a model list",
                               transient=False)
        return [m["id"] for m in data["data"] if isinstance(m, dict) and "id" in m]

    async def chat(self, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/chat/completions``; the parsed JSON answer."""
        return self._finish(await self._exchange(lambda: self._post(body), stream=False))

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its server-sent events."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        conn = await self._exchange(lambda: self._post(body), stream=True)
        try:
            answer, buffer = StreamedAnswer(), b""
            unpack = _decompressor(conn.headers.get(b"content-encoding", b""))
            while (piece := await conn.stream.get()) is not _END:  # type: ignore[union-attr]
                if isinstance(piece, ServingError):
                    raise piece
                if conn.status >= 400:  # an error answer: its body is JSON, read below
                    conn.chunks.append(piece)
                    continue
                if unpack is not None:
                    try:
                        piece = unpack.decompress(piece)
                    except zlib.error as exc:
                        raise ServingError("BadResponse", f"cannot decompress the stream: {exc}",
                                           transient=True) from None
                buffer += piece
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    answer.add_line(raw)
        except BaseException:
            self._drop(conn)
            raise
        finally:
            conn.timer.cancel()
        if conn.status >= 400:
            return self._finish(conn)  # raises the status error
        self._release(conn)
        return answer.response()

    def _post(self, body: dict[str, Any]) -> list[bytes]:
        payload = json.dumps(body, ensure_ascii=False).encode()
        return [self._chat_head, b"%d\r\n\r\n" % len(payload), payload]

    async def _exchange(self, request: Callable[[], list[bytes]], stream: bool) -> _Connection:
        """Send the bytes ``request()`` makes on a pooled connection, and wait for the answer
        (for a stream: for its headers, leaving ``conn.timer`` running). The bytes are made
        again for a second try rather than held while the answer is awaited: with hundreds
        of images in flight, that is megabytes."""
        loop = asyncio.get_running_loop()
        for again in (False, True):
            try:
                data = request()
            except (TypeError, ValueError) as exc:
                raise ServingError("BadRequest", f"the request cannot be sent as JSON: {exc}",
                                   transient=False) from None
            conn, reused = await self._connection(loop, fresh=again)
            waiter = conn.begin(loop, stream)
            conn.timer = loop.call_later(self.timeout, conn.time_out, self.timeout)
            assert conn.transport is not None
            conn.transport.writelines(data)
            del data  # not held while the answer is awaited
            try:
                await waiter
            except ServingError:
                conn.timer.cancel()
                self._drop(conn)
                # A kept-alive connection the server closed just as it was reused (a clean
                # close, before any answer): once more on a new one. Anything else is left to
                # the engine's retries, where it is counted.
                if reused and conn.closed_cleanly and not conn.got_data:
                    continue
                raise
            except BaseException:
                conn.timer.cancel()
                self._drop(conn)
                raise
            if not stream:
                conn.timer.cancel()
            return conn
        raise AssertionError("unreachable: the second try is on a new connection")

    async def _connection(self, loop: asyncio.AbstractEventLoop,
                          fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection of the pool (and True), or a new one (and False)."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.lost:
                self._busy.add(conn)
                return conn, True
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl,
                                       server_hostname=self.host if self.ssl else None),
                self.timeout,
            )
        except asyncio.TimeoutError:
            raise ServingError("Timeout", f"could not connect within {self.timeout:g} s",
                               transient=True) from None
        except OSError as exc:
            raise ServingError("ConnectionError", f"cannot connect to {self.host}:{self.port}:"
                               f" {exc.strerror or exc}", transient=True) from None
        except ValueError as exc:  # e.g. a host name no resolver can encode
            raise ServingError("ConnectionError", f"cannot connect to {self.host}: {exc}",
                               transient=False) from None
        self._busy.add(conn)
        return conn, False

    def _finish(self, conn: _Connection) -> Any:
        """The answer's JSON, after giving the connection back to the pool."""
        self._release(conn)
        retry_after = conn.headers.get(b"retry-after")
        return decode_answer(conn.status, conn.reason.decode("latin-1"), conn.body(),
                             retry_after.decode("latin-1") if retry_after else None)

    def _drop(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if not conn.lost:
            conn.fail(ServingError("ConnectionError", "abandoned", transient=True))

    def _release(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn.complete and conn.keep_alive and not conn.lost:
            conn.waiter = conn.stream = None
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def close(self) -> None:
        """Close every connection."""
        for conn in [*self._idle, *self._busy]:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        self._busy.clear()


def _decompressor(encoding: bytes) -> Any:
    """A zlib decompressor for a gzip or deflate ``Content-Encoding``, else None."""
    encoding = encoding.lower()
    if encoding in (b"gzip", b"deflate"):
        return zlib.decompressobj(47 if encoding == b"gzip" else 15)
    return None


def _warn_about_proxies(host: str, scheme: str) -> None:
    if host in ("localhost", "127.0.0.1", "::1"):
        return
    proxy = os.environ.get(f"{scheme}_proxy") or os.environ.get(f"{scheme.upper()}_PROXY")
    if proxy:
        log.warning("%s_PROXY is set, but serving.transport=http connects directly: use "
                    "serving.transport=sdk to go through the proxy", scheme.upper())
