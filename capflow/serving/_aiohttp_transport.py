"""A lean aiohttp client for the chat-completions protocol (``serving.transport=aiohttp``).

It speaks the same HTTP and JSON as the official SDK, with one connection pool sized to the
requests in flight and nothing else per request: a fraction of the SDK's CPU cost per request,
which is what bounds throughput at hundreds of requests in flight, and no SDK import at start.
It goes through the HTTP proxy the environment sets for the API (``serving.transport=auto``
picks it then).

The session built here (``make_session``) also carries the ``sdk`` transport, so both keep the
same limits: aiohttp's own decompression is off (``CappedBody`` inflates within
``max_response_bytes``), redirects are not followed, cookies are not kept, and header sizes
and counts are capped by the parser.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import http_exceptions
from yarl import URL

from capflow import __version__
from capflow.errors import ServingError
from capflow.redaction import clean_message
from capflow.request import Response
from capflow.serving._protocol import CappedBody, StreamedAnswer, answer, decode_answer, model_ids
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

# Set when aiohttp takes a kept-alive connection from its pool for the current request (the
# trace callback runs in the request's own task, so the flag is the request's own).
_reused: ContextVar[bool] = ContextVar("capflow_connection_reused", default=False)


async def _on_reuse(session: Any, context: Any, params: Any) -> None:
    _reused.set(True)


def tls_context(api_url: str, options: TransportOptions) -> ssl.SSLContext | bool:
    """The TLS context for ``api_url`` (True, aiohttp's default, for plain HTTP)."""
    if urlsplit(api_url).scheme == "https":
        return ssl_context(options.ca_file)
    check_ca_file(options.ca_file)
    return True


def make_session(api_url: str, options: TransportOptions,
                 context: ssl.SSLContext | bool) -> aiohttp.ClientSession:
    """An aiohttp session with capflow's limits, for the API at ``api_url``."""
    proxy, proxy_auth = None, None
    if (url := proxy_for(api_url)) is not None:
        proxy = URL(url)
        proxy_auth = aiohttp.BasicAuth.from_url(proxy)
        proxy = proxy.with_user(None)
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=options.connections, limit_per_host=0, ssl=context),
        timeout=aiohttp.ClientTimeout(total=options.timeout),
        # The proxy is the one the environment sets (the rule ``auto`` follows), given here
        # rather than by trust_env=True, which would also look ~/.netrc up in a thread for
        # every request and fail when it holds the API host.
        proxy=proxy,
        proxy_auth=proxy_auth,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        max_field_size=MAX_HEADER_BYTES,
        max_headers=MAX_HEADER_COUNT,
        trace_configs=[trace],
        json_serialize=json.dumps,
    )


def check_head(status: int, headers: Any, raw_headers: Any, content_length: int | None,
               limit: int, api_url: str) -> None:
    """Refuse an answer by its head: a redirect, too many header bytes, too long a body."""
    if 300 <= status < 400:
        raise redirect_error(status, headers.get("Location"), api_url)
    if sum(len(name) + len(value) for name, value in raw_headers) > MAX_HEADER_BYTES:
        raise headers_too_large()
    if content_length is not None and content_length > limit:
        raise too_large(limit)


def aiohttp_error(exc: BaseException, host: str, port: int, seconds: float) -> ServingError:
    """The ``ServingError`` for what aiohttp (or a client wrapping it) raised. The SDK's
    aiohttp transport renames aiohttp's errors (a reset becomes an httpx ``ConnectTimeout``):
    the first aiohttp-level error down the cause chain decides."""
    root: BaseException = exc
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, ServingError):
            return seen
        if isinstance(seen, aiohttp.ClientConnectorCertificateError):
            reason = seen.certificate_error
            return tls_error(host, port, getattr(reason, "verify_message", None) or reason)
        if isinstance(seen, ssl.SSLCertVerificationError):
            return tls_error(host, port, seen.verify_message or seen)
        if isinstance(seen, http_exceptions.LineTooLong) or (
                isinstance(seen, http_exceptions.BadHttpMessage)
                and "too many headers" in str(seen).lower()):
            return headers_too_large()
        if root is exc and isinstance(seen, (aiohttp.ClientError, OSError)):
            root = seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(root, asyncio.TimeoutError) or (
            root is exc and type(exc).__name__.endswith("Timeout")):
        return timeout_error(seconds)
    if isinstance(root, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
        return ServingError("ConnectionError", clean_message(str(root) or type(root).__name__),
                            transient=True)
    return ServingError("BadResponse", clean_message(f"unreadable response: {root}"),
                        transient=True)


def is_stale(exc: BaseException) -> bool:
    """Whether ``exc`` is a kept-alive connection the server closed just as it was reused
    (a clean close before any answer): the one failure sent once more at once."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, aiohttp.ServerDisconnectedError):
            return _reused.get()
        seen = seen.__cause__
    return False


class AiohttpTransport:
    """Chat completions over one ``aiohttp.ClientSession``."""

    def __init__(self, api_url: str, key: str | None, options: TransportOptions) -> None:
        parts = endpoint_parts(api_url, key)
        self.api_url = api_url
        self.base = api_url.rstrip("/")
        assert parts.hostname is not None  # endpoint_parts refuses a URL without a host
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.timeout = options.timeout
        self.limit = options.max_response_bytes
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "Accept-Encoding": "gzip, deflate", "User-Agent": f"capflow/{__version__}"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self._session = make_session(api_url, options, tls_context(api_url, options))

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        return await self._send("GET", "/models", None, self._models)

    async def chat(self, body: dict[str, Any]) -> Response:
        """POST ``body`` to ``/chat/completions``; the answer."""
        return await self._send("POST", "/chat/completions", self._payload(body), self._answer)

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its server-sent events."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        return await self._send("POST", "/chat/completions", self._payload(body), self._stream)

    def _payload(self, body: dict[str, Any]) -> bytes:
        try:
            return json.dumps(body, ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            raise ServingError("BadRequest", f"the request cannot be sent as JSON: {exc}",
                               transient=False) from None

    async def _send(self, method: str, path: str, payload: bytes | None, read: Any) -> Any:
        """Send the request (once more at once if it met a stale kept-alive connection) and
        hand the answer to ``read``."""
        for again in (False, True):
            _reused.set(False)
            try:
                async with self._session.request(method, self.base + path, data=payload,
                                                  headers=self.headers,
                                                  allow_redirects=False) as resp:
                    check_head(resp.status, resp.headers, resp.raw_headers, resp.content_length,
                               self.limit, self.api_url)
                    return await read(resp)
            except ServingError:
                raise
            except Exception as exc:
                if not again and is_stale(exc):
                    continue
                raise aiohttp_error(exc, self.host, self.port, self.timeout) from None
        raise AssertionError("unreachable")

    async def _body(self, resp: aiohttp.ClientResponse) -> bytes:
        unpack = CappedBody(self.limit, resp.headers.get("Content-Encoding"))
        parts = [unpack.feed(chunk) async for chunk in resp.content.iter_any()]
        parts.append(unpack.finish())
        return b"".join(parts)

    async def _models(self, resp: aiohttp.ClientResponse) -> list[str]:
        data = decode_answer(resp.status, resp.reason or "", await self._body(resp),
                             resp.headers.get)
        return model_ids(data)

    async def _answer(self, resp: aiohttp.ClientResponse) -> Response:
        return answer(resp.status, resp.reason or "", await self._body(resp), resp.headers.get)

    async def _stream(self, resp: aiohttp.ClientResponse) -> Response:
        if resp.status >= 400:
            decode_answer(resp.status, resp.reason or "", await self._body(resp),
                          resp.headers.get)
        limits = rate_limit_info(resp.headers.get)
        try:
            streamed = StreamedAnswer(json_body="json" in resp.content_type)
            unpack = CappedBody(self.limit, resp.headers.get("Content-Encoding"))
            async for chunk in resp.content.iter_any():
                streamed.feed(unpack.feed(chunk))
                if streamed.done:
                    break
            else:
                streamed.feed(unpack.finish())
            return streamed.response(limits)
        except ServingError as exc:
            exc.rate_limits = exc.rate_limits or limits
            raise

    async def close(self) -> None:
        """Close the session's connections."""
        await self._session.close()
