"""capflow's own HTTP/1.1 client for the chat-completions protocol (``serving.transport=http``).

At hundreds of requests in flight, the client's own CPU per request is what bounds throughput
on a small machine. This client does per request only what the protocol and the limits need:
one write of the request, and httptools (llhttp, the parser behind Node.js and uvicorn) to read
the answer, on a pool of keep-alive connections as large as the requests in flight; bytes are
counted as they arrive, never copied to be counted. It also imports in a few milliseconds,
against a fifth of a second for a general-purpose client.

It speaks plain HTTP/1.1 and TLS (verified against the system's CAs plus ``serving.ca_file``).
It does not go through HTTP proxies (``serving.transport=auto`` picks the aiohttp client when
one applies), never follows redirects, and sends nothing the server said back to it (no
cookies).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httptools

from capflow import __version__
from capflow.errors import ServingError
from capflow.redaction import clean_message
from capflow.request import Response
from capflow.serving._protocol import (
    CappedBody,
    StreamedAnswer,
    decode_answer,
    model_ids,
    parse_completion,
)
from capflow.serving.ratelimit_headers import rate_limit_info
from capflow.serving.transport import (
    MAX_HEADER_BYTES,
    MAX_HEADER_COUNT,
    TransportOptions,
    check_ca_file,
    endpoint_parts,
    headers_too_large,
    proxy_for,
    redirect_error,
    ssl_context,
    timeout_error,
    tls_error,
    too_large,
)

log = logging.getLogger("capflow")

_END = object()  # the end of a streamed body


class _NeverRaised(Exception):
    """Stands in for ``ssl.SSLCertVerificationError`` on plain-HTTP transports."""


def _getter(headers: dict[bytes, bytes]) -> Any:
    """Looks a header up by its lower-case ``str`` name, as ``ratelimit_headers`` wants."""
    def get(name: str) -> str | None:
        value = headers.get(name.encode())
        return value.decode("latin-1") if value is not None else None
    return get


def _rate_limits(headers: dict[bytes, bytes], get: Any) -> Any:
    """What the ``x-ratelimit-*`` headers say; the common case, none, costs two lookups."""
    if b"x-ratelimit-remaining-requests" in headers or b"x-ratelimit-remaining-tokens" in headers:
        return rate_limit_info(get)
    return None


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time. Limits are checked in the
    parser's callbacks, which raise to stop the parse at once."""

    def __init__(self, owner: HttpTransport) -> None:
        self.owner = owner
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
        self.head_done = False
        self.head_bytes = 0  # bytes read while no answer's headers were complete
        self.header_count = self.header_bytes = 0
        self.received = 0  # body bytes

    def begin(self, loop: asyncio.AbstractEventLoop, stream: bool) -> asyncio.Future[None]:
        """Get ready for the next answer; the future is done when it is in (for a stream:
        when its headers are), or fails with a ``ServingError``."""
        self.status, self.reason, self.headers, self.chunks = 0, b"", {}, []
        self.complete = self.got_data = self.keep_alive = self.head_done = False
        self.head_bytes = self.header_count = self.header_bytes = self.received = 0
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
        self.fail(timeout_error(seconds))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection cannot be trusted
            self.fail(ServingError("BadResponse", "unexpected data from the server",
                                   transient=True))
            return
        if self.lost:
            return
        self.got_data = True
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, ServingError):  # a limit, raised in a callback
                self.fail(exc.__context__)
            else:
                self.fail(ServingError("BadResponse",
                                       clean_message(f"malformed HTTP response: {exc}"),
                                       transient=True))
            return
        # httptools holds a header until it has all of it: an endless one is cut off here,
        # after at most one read past the limit.
        if not self.head_done and self.head_bytes > MAX_HEADER_BYTES:
            self.fail(headers_too_large())

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed_cleanly = exc is None
        if self.waiter is None or self.complete:
            return
        if (exc is None and self.status and b"content-length" not in self.headers
                and not self._chunked()):
            self.on_message_complete()  # a body that ends where the connection does
            return
        reason = clean_message(f": {exc}") if exc else ""
        self.fail(ServingError("ConnectionError",
                               f"the server closed the connection mid-answer{reason}",
                               transient=True))

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > MAX_HEADER_COUNT or self.header_bytes > MAX_HEADER_BYTES:
            raise headers_too_large()
        self.headers[name.lower()] = value

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: never reuse this connection
            self.keep_alive = False
            self.lost = True

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        if self._interim():
            return
        self.head_done = True
        if 300 <= status < 400:
            location = self.headers.get(b"location")
            raise redirect_error(status, location.decode("latin-1") if location else None,
                                 self.owner.api_url)
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.owner.limit:
            raise too_large(self.owner.limit)
        if self.stream is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._interim():
            return
        self.received += len(body)
        if self.received > self.owner.limit:
            raise too_large(self.owner.limit)
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
        data = b"".join(self.chunks)  # one chunk: the same object, not a copy
        encoding = self.headers.get(b"content-encoding")
        if encoding is not None:
            unpack = CappedBody(self.owner.limit, encoding.decode("latin-1"))
            data = unpack.decompress(data) + unpack.finish()
        return data


class HttpTransport:
    """Chat completions over capflow's own pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, api_url: str, key: str | None, options: TransportOptions) -> None:
        parts = endpoint_parts(api_url, key)
        port = parts.port
        self.api_url = api_url
        self.timeout = options.timeout
        self.limit = options.max_response_bytes
        assert parts.hostname is not None  # endpoint_parts refuses a URL without a host
        self.host = parts.hostname
        self.port = port or (443 if parts.scheme == "https" else 80)
        self.ssl: Any = None
        self._verify_error: type[BaseException] = _NeverRaised
        if parts.scheme == "https":
            import ssl

            self.ssl = ssl_context(options.ca_file)
            self._verify_error = ssl.SSLCertVerificationError
        else:
            check_ca_file(options.ca_file)
        host = parts.netloc.rsplit("@", 1)[-1]
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        path = parts.path.rstrip("/")
        common = (
            f"Host: {host}\r\n"
            f"User-Agent: capflow/{__version__}\r\n"
            "Accept: application/json\r\nAccept-Encoding: gzip, deflate\r\n"
            + (f"Authorization: Bearer {key}\r\n" if key else "")
        )
        # latin-1: what HTTP/1.1 header bytes are; check_key let nothing else through.
        self._chat_head = (f"POST {path}/chat/completions HTTP/1.1\r\n{common}"
                           "Content-Type: application/json\r\nContent-Length: ").encode("latin-1")
        self._models_head = f"GET {path}/models HTTP/1.1\r\n{common}\r\n".encode("latin-1")
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        if proxy_for(api_url):
            log.warning("an HTTP proxy is set for %s, but serving.transport=http connects"
                        " directly: use serving.transport=auto (or aiohttp) to go through it",
                        self.host)

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        conn = await self._exchange(self._models_head, None, stream=False)
        self._release(conn)
        return model_ids(decode_answer(conn.status, conn.reason.decode("latin-1"), conn.body(),
                                       _getter(conn.headers)))

    async def chat(self, body: dict[str, Any]) -> Response:
        """POST ``body`` to ``/chat/completions``; the answer."""
        conn = await self._exchange(self._chat_head, body, stream=False)
        self._release(conn)
        get = _getter(conn.headers)
        data = decode_answer(conn.status, conn.reason.decode("latin-1"), conn.body(), get)
        return parse_completion(data, _rate_limits(conn.headers, get))

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its server-sent events."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        conn = await self._exchange(self._chat_head, body, stream=True)
        get = _getter(conn.headers)
        limits = _rate_limits(conn.headers, get)
        try:
            content_type = conn.headers.get(b"content-type", b"")
            streamed = StreamedAnswer(json_body=b"json" in content_type.lower())
            encoding = conn.headers.get(b"content-encoding")
            unpack = CappedBody(self.limit, encoding.decode("latin-1") if encoding else None)
            while (piece := await conn.stream.get()) is not _END:  # type: ignore[union-attr]
                if isinstance(piece, ServingError):
                    raise piece
                if conn.status >= 400:  # an error answer: its body is JSON, read below
                    conn.chunks.append(piece)
                    continue
                streamed.feed(unpack.decompress(piece))
                if streamed.done:  # [DONE] is the end, whether or not the body ends there
                    break
            else:
                if conn.status < 400:
                    streamed.feed(unpack.finish())
        except ServingError as exc:
            self._drop(conn)
            exc.rate_limits = exc.rate_limits or limits
            raise
        except BaseException:
            self._drop(conn)
            raise
        finally:
            if conn.timer is not None:
                conn.timer.cancel()
        if conn.complete:
            self._release(conn)
        else:
            self._drop(conn)  # the rest of its body is not worth waiting for
        if conn.status >= 400:
            decode_answer(conn.status, conn.reason.decode("latin-1"), conn.body(), get)
        try:
            return streamed.response(limits)
        except ServingError as exc:
            exc.rate_limits = exc.rate_limits or limits
            raise

    def _request(self, head: bytes, body: dict[str, Any] | None) -> list[bytes]:
        if body is None:
            return [head]
        try:
            payload = json.dumps(body, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ServingError("BadRequest", f"the request cannot be sent as JSON: {exc}",
                               transient=False) from None
        return [head, b"%d\r\n\r\n" % len(payload), payload]

    async def _exchange(self, head: bytes, body: dict[str, Any] | None,
                        stream: bool) -> _Connection:
        """Send the request on a pooled connection, and wait for the answer (for a stream:
        for its headers, leaving ``conn.timer`` running). One deadline covers connecting,
        sending and the whole answer. The bytes are made again for a second try rather than
        held while the answer is awaited: with hundreds of images in flight, that is
        megabytes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        for again in (False, True):
            data = self._request(head, body)
            conn, reused = await self._connection(loop, deadline, fresh=again)
            waiter = conn.begin(loop, stream)
            conn.timer = loop.call_at(deadline, conn.time_out, self.timeout)
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

    async def _connection(self, loop: asyncio.AbstractEventLoop, deadline: float,
                          fresh: bool = False) -> tuple[_Connection, bool]:
        """An idle connection of the pool (and True), or a new one (and False)."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if not conn.lost:
                self._busy.add(conn)
                return conn, True
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port,
                                       ssl=self.ssl,
                                       server_hostname=self.host if self.ssl else None),
                max(0.0, deadline - loop.time()),
            )
        except asyncio.TimeoutError:
            raise ServingError("Timeout", f"could not connect within {self.timeout:g} s",
                               transient=True) from None
        except self._verify_error as exc:
            reason = getattr(exc, "verify_message", None) or exc
            raise tls_error(self.host, self.port, reason) from None
        except OSError as exc:
            raise ServingError("ConnectionError", clean_message(
                f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}"),
                transient=True) from None
        except ValueError as exc:  # e.g. a host name no resolver can encode
            raise ServingError("ConnectionError", clean_message(
                f"cannot connect to {self.host}: {exc}"), transient=False) from None
        self._busy.add(conn)
        return conn, False

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
