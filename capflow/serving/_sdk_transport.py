"""The official ``openai`` SDK as capflow's transport (``serving.transport=sdk``)."""

from __future__ import annotations

from typing import Any

from capflow.errors import ServingError
from capflow.request import Response
from capflow.serving._protocol import StreamedAnswer, server_message, status_error

_NO_KEY = "no-key"  # the SDK insists on some key; keyless local servers ignore it


class SDKTransport:
    """Chat completions through ``openai.AsyncOpenAI`` with its aiohttp HTTP client."""

    def __init__(self, api_url: str, key: str | None, timeout: float, connections: int) -> None:
        import openai  # imported here: only this transport pays for the SDK

        self._openai = openai
        self.timeout = timeout
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=connections, max_keepalive_connections=connections
        )
        self._client = openai.AsyncOpenAI(
            base_url=api_url,
            api_key=key or _NO_KEY,
            timeout=timeout,
            max_retries=0,  # capflow's engine retries, with its own policy
            http_client=openai.DefaultAioHttpClient(timeout=timeout, limits=limits),
        )

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        try:
            return [m.id async for m in self._client.models.list()]
        except self._openai.APIError as exc:
            raise self._error(exc) from None

    async def chat(self, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/chat/completions``; the parsed JSON answer."""
        try:
            # The SDK's generic post: its auth, transport and error mapping, without walking
            # every message (and its base64 images) through the typed-parameter transform.
            return await self._client.post("/chat/completions", cast_to=object, body=body)
        except (self._openai.APIError, ValueError) as exc:
            raise self._error(exc) from None

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its chunks."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        answer = StreamedAnswer()
        try:
            stream = await self._client.post(
                "/chat/completions", cast_to=object, body=body, stream=True,
                stream_cls=self._openai.AsyncStream[object],
            )
            async for chunk in stream:
                answer.add(chunk)
        except (self._openai.APIError, ValueError) as exc:
            raise self._error(exc) from None
        return answer.response()

    def _error(self, exc: Exception) -> ServingError:
        openai = self._openai
        if isinstance(exc, openai.APIStatusError):
            header = exc.response.headers.get("retry-after") if exc.response is not None else None
            message = server_message(getattr(exc, "body", None), str(exc.message))
            return status_error(exc.status_code, message, header)
        if isinstance(exc, openai.APITimeoutError):
            # The aiohttp client reports a refused connection as a connect "timeout".
            if type(exc.__cause__).__name__.startswith("Connect"):
                return ServingError("ConnectionError", str(exc.__cause__), transient=True)
            return ServingError("Timeout", f"no answer within {self.timeout:g} s", transient=True)
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            return ServingError("ConnectionError", f"{exc}: {cause}" if cause else str(exc),
                                transient=True)
        return ServingError("BadResponse", f"unreadable response: {exc}", transient=True)

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.close()
