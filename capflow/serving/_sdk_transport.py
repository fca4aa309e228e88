"""The official ``openai`` SDK as capflow's transport (``serving.transport=sdk``).

The SDK's ``AsyncOpenAI`` builds and sends every request (its headers, auth and JSON), over its
``DefaultAioHttpClient``. Under that client sits an HTTP transport of capflow's (``_Guard``)
around the SDK's own aiohttp transport and a session made by ``make_session``, so that the SDK
keeps the limits every transport keeps: redirects refused before the SDK sees them (the SDK
follows them by default), bodies read within ``max_response_bytes`` (httpx's own unbounded
decompression never sees a compressed body), header limits, no cookies kept, and one deadline
for the whole request (the SDK's timeouts are per read, so a server dripping a byte at a time
would hold it forever). Answers are read by the same code as the other transports'.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx2

from capflow.errors import ServingError
from capflow.redaction import clean_message
from capflow.request import Response
from capflow.serving._aiohttp_transport import (
    aiohttp_error,
    check_head,
    is_stale,
    make_session,
)
from capflow.serving._protocol import CappedBody, StreamedAnswer, answer, decode_answer, model_ids
from capflow.serving.ratelimit_headers import rate_limit_info
from capflow.serving.transport import (
    TransportOptions,
    endpoint_parts,
    ssl_context,
    timeout_error,
    within,
)

_NO_KEY = "no-key"  # the SDK insists on some key; keyless local servers ignore it
# Response headers httpx must not act on: the body is decompressed here, within the limit,
# and nothing the server sets goes back to it.
_DROPPED = {b"content-encoding", b"content-length", b"set-cookie"}


class _CappedStream(httpx2.AsyncByteStream):
    """A response body read within the limit, decompressed here."""

    def __init__(self, inner: httpx2.AsyncByteStream, unpack: CappedBody, guard: _Guard) -> None:
        self.inner, self.unpack, self.guard = inner, unpack, guard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield self.unpack.feed(chunk)
            yield self.unpack.finish()
        except ServingError:
            raise
        except Exception as exc:
            raise self.guard.error(exc) from None

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Guard(httpx2.AsyncBaseTransport):
    """The SDK's aiohttp transport, held to capflow's limits."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, api_url: str, limit: int,
                 timeout: float) -> None:
        self.inner, self.api_url, self.limit, self.timeout = inner, api_url, limit, timeout
        parts = urlsplit(api_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)

    def error(self, exc: BaseException) -> ServingError:
        return aiohttp_error(exc, self.host, self.port, self.timeout)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        for again in (False, True):
            try:
                response = await self.inner.handle_async_request(request)
                break
            except Exception as exc:
                if not again and is_stale(exc):
                    continue  # a kept-alive connection closed as it was reused: once more
                raise self.error(exc) from None
        raw = response.headers.raw
        try:
            check_head(response.status_code, response.headers, raw,
                       _length(response.headers.get("content-length")), self.limit,
                       self.api_url)
            unpack = CappedBody(self.limit, response.headers.get("content-encoding"))
        except ServingError:
            await response.aclose()
            raise
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=[(k, v) for k, v in raw if k.lower() not in _DROPPED],
            stream=_CappedStream(response.stream, unpack, self),
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def _length(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


class SDKTransport:
    """Chat completions through ``openai.AsyncOpenAI`` with its aiohttp HTTP client."""

    def __init__(self, api_url: str, key: str | None, options: TransportOptions) -> None:
        endpoint_parts(api_url, key)
        import openai  # imported here: only this transport pays for the SDK
        from openai._vendor.httpx_aiohttp.transport import AiohttpTransport

        self._openai = openai
        self.timeout = options.timeout
        context = ssl_context(options.ca_file)
        session = make_session(api_url, options, context)
        guard = _Guard(AiohttpTransport(client=session, verify=context), api_url,
                       options.max_response_bytes, options.timeout)
        self._client = openai.AsyncOpenAI(
            base_url=api_url,
            api_key=key or _NO_KEY,
            timeout=options.timeout,
            max_retries=0,  # capflow's engine retries, with its own policy
            default_headers={"Accept-Encoding": "gzip, deflate"},  # what CappedBody reads
            http_client=openai.DefaultAioHttpClient(
                transport=guard, timeout=options.timeout, follow_redirects=False,
                # Proxies come from make_session (the environment's, as for aiohttp); httpx
                # would otherwise mount a transport of its own for them, past the guard.
                trust_env=False,
            ),
        )

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        resp = await self._call(self._client.get("/models", cast_to=httpx2.Response))
        return model_ids(decode_answer(resp.status_code, resp.reason_phrase, resp.content,
                                       resp.headers.get))

    async def chat(self, body: dict[str, Any]) -> Response:
        """POST ``body`` to ``/chat/completions``; the answer."""
        # The SDK's generic post: its auth, transport and error mapping, without walking
        # every message (and its base64 images) through the typed-parameter transform.
        resp = await self._call(self._client.post("/chat/completions", cast_to=httpx2.Response,
                                                  body=body))
        return answer(resp.status_code, resp.reason_phrase, resp.content, resp.headers.get)

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its events."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        return await self._call(self._stream(body))

    async def _stream(self, body: dict[str, Any]) -> Response:
        resp = await self._client.post("/chat/completions", cast_to=httpx2.Response, body=body,
                                       stream=True)
        limits = rate_limit_info(resp.headers.get)
        try:
            content_type = resp.headers.get("content-type", "").lower()
            streamed = StreamedAnswer(json_body="json" in content_type)
            async for chunk in resp.aiter_raw():
                streamed.feed(chunk)
                if streamed.done:
                    break
            return streamed.response(limits)
        except ServingError as exc:
            exc.rate_limits = exc.rate_limits or limits
            raise
        finally:
            await resp.aclose()

    async def _call(self, work: Any) -> Any:
        """``work`` (a call of the SDK) within the deadline, its failures as capflow's."""
        openai = self._openai
        try:
            return await within(self.timeout, work)
        except ServingError:
            raise
        except openai.APIStatusError as exc:
            resp = exc.response
            decode_answer(resp.status_code, resp.reason_phrase, resp.content, resp.headers.get)
            raise AssertionError("unreachable: an error status raises") from None
        except openai.APITimeoutError:
            raise timeout_error(self.timeout) from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc.__context__
            raise ServingError("ConnectionError", clean_message(
                f"{exc}: {cause}" if cause else str(exc)), transient=True) from None
        except (openai.APIError, ValueError) as exc:
            raise ServingError("BadResponse", clean_message(f"unreadable response: {exc}"),
                               transient=True) from None

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.close()
