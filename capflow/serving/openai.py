"""OpenAIServing: any OpenAI-compatible chat-completions API, through the official SDK."""

from __future__ import annotations

import logging
import os
from typing import Any

from capflow.errors import ConfigError, ServingError
from capflow.request import Request, Response, Usage
from capflow.serving.base import Serving

log = logging.getLogger(__name__)

# Statuses worth another try: rate limits, timeouts and server-side failures.
_TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_NO_KEY = "no-key"  # the SDK insists on some key; keyless local servers ignore it


class OpenAIServing(Serving):
    """Sends requests to an OpenAI-compatible ``/chat/completions`` endpoint.

    :param api_url: the API base URL, e.g. ``http://127.0.0.1:8000/v1``.
    :param key_name_of_api_key: the NAME of the environment variable holding the API key. When
        it is unset, requests go without a key (fine for local servers).
    :param model_name: the model; when None, the server's only model (from ``/models``).
    :param max_workers: requests kept in flight.
    :param timeout: seconds one request may take before it is abandoned (and retried).
    :param temperature: sampling temperature (server default when None).
    :param max_tokens: cap on the answer's tokens.
    :param top_p: nucleus-sampling mass.
    :param seed: sampling seed, for servers that support it.
    :param extra_body: more JSON fields for the request body, passed through as they are.
    :param send_request_stream: receive the answer as a stream of chunks.
    """

    def __init__(
        self,
        api_url: str | None,
        key_name_of_api_key: str | None = "CAPFLOW_API_KEY",
        model_name: str | None = None,
        max_workers: int = 10,
        timeout: float = 60.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        send_request_stream: bool = False,
    ) -> None:
        if int(max_workers) < 1:
            raise ConfigError(f"max_workers must be at least 1, not {max_workers}")
        if float(timeout) <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        self.api_url = str(api_url) if api_url else None
        self.key_name_of_api_key = key_name_of_api_key
        self.model_name = model_name
        self.max_workers = int(max_workers)
        self.timeout = float(timeout)
        self.send_request_stream = bool(send_request_stream)
        params = {
            "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p, "seed": seed
        }
        self.params = {k: v for k, v in params.items() if v is not None}
        self.extra_body = dict(extra_body or {})
        self._client: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            "serving": type(self).__name__,
            "model": self.model_name,
            "params": self.params,
            "extra_body": self.extra_body,
        }

    def unavailable(self) -> str | None:
        if not self.api_url:
            return "no API endpoint is set"
        return None

    async def start(self) -> None:
        import openai  # imported here: dry runs and --help never pay for the SDK

        key = os.environ.get(self.key_name_of_api_key) if self.key_name_of_api_key else None
        if not key:
            log.info(
                "environment variable %s is not set: sending requests without an API key",
                self.key_name_of_api_key,
            )
        limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
            max_connections=self.max_workers, max_keepalive_connections=self.max_workers
        )
        self._client = openai.AsyncOpenAI(
            base_url=self.api_url,
            api_key=key or _NO_KEY,
            timeout=self.timeout,
            max_retries=0,  # capflow's engine retries, with its own policy
            http_client=openai.DefaultAioHttpClient(timeout=self.timeout, limits=limits),
        )
        if not self.model_name:
            self.model_name = await self._only_model()

    async def _only_model(self) -> str:
        import openai

        try:
            models = [m.id async for m in self._client.models.list()]
        except openai.AuthenticationError as exc:
            raise ConfigError(f"the server refused the API key: {_server_message(exc)}") from None
        except openai.APIStatusError as exc:
            raise ConfigError(
                f"model_name is not set and {self.api_url}/models answered"
                f" HTTP {exc.status_code}: {_server_message(exc)}; set model_name=..."
            ) from None
        except openai.APIError as exc:
            reason = str(exc.__cause__ or exc).splitlines()[0]
            raise ConfigError(f"cannot reach {self.api_url}: {reason}") from None
        if len(models) != 1:
            shown = ", ".join(models[:10]) or "none"
            raise ConfigError(f"model_name is not set and the server offers {shown}: set one")
        log.info("model_name not set: using the server's only model, %s", models[0])
        return models[0]

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, request: Request) -> Response:
        import openai

        try:
            if self.send_request_stream:
                kwargs: dict[str, Any] = {"model": self.model_name, "messages": request.messages}
                kwargs.update(self.params)
                if self.extra_body:
                    kwargs["extra_body"] = self.extra_body
                return await self._complete_streamed(kwargs)
            # The SDK's generic post: its auth, transport and error mapping, without walking
            # every message (and its base64 images) through the typed-parameter transform.
            body = {"model": self.model_name, "messages": request.messages, **self.params,
                    **self.extra_body}
            completion = await self._client.post("/chat/completions", cast_to=object, body=body)
        except openai.APIStatusError as exc:
            raise _status_error(exc) from None
        except openai.APITimeoutError as exc:
            # The aiohttp transport reports a refused connection as a connect "timeout".
            if type(exc.__cause__).__name__.startswith("Connect"):
                raise ServingError("ConnectionError", str(exc.__cause__), transient=True) from None
            raise ServingError(
                "Timeout", f"no answer within {self.timeout:g} s", transient=True
            ) from None
        except openai.APIConnectionError as exc:
            raise ServingError("ConnectionError", _describe(exc), transient=True) from None
        except (openai.APIResponseValidationError, ValueError) as exc:
            raise ServingError(
                "BadResponse", f"unreadable response: {exc}", transient=True
            ) from None
        return _parse_completion(completion)

    async def _complete_streamed(self, kwargs: dict[str, Any]) -> Response:
        stream = await self._client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
        parts: list[str] = []
        usage, finish, model = Usage(), None, None
        async for chunk in stream:
            model = chunk.model or model
            if chunk.usage:
                usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            for choice in chunk.choices or ():
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                finish = choice.finish_reason or finish
        return Response("".join(parts), usage, finish, model)


def _parse_completion(completion: Any) -> Response:
    """A Response from a chat-completion JSON body; a malformed body is a transient error."""
    try:
        choice = completion["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content")
        usage = completion.get("usage") or {}
        finish = choice.get("finish_reason")
    except (TypeError, KeyError, IndexError, AttributeError):
        raise ServingError("BadResponse", "response has no choices", transient=True) from None
    if not isinstance(text, str):
        raise ServingError(
            "EmptyAnswer", f"answer has no text (finish_reason={finish})", transient=False
        )
    return Response(
        text=text,
        usage=Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)),
        finish_reason=finish,
        model=completion.get("model"),
    )


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{exc}: {cause}" if cause and str(cause) else str(exc)


def _status_error(exc: Any) -> ServingError:
    status = exc.status_code
    message = _server_message(exc)
    retry_after = None
    header = exc.response.headers.get("retry-after") if exc.response is not None else None
    if header:
        try:
            retry_after = max(0.0, float(header))
        except ValueError:
            retry_after = None
    kind = {
        400: "BadRequest", 401: "AuthenticationError", 403: "PermissionDenied",
        404: "NotFound", 422: "Unprocessable", 429: "RateLimited",
    }.get(status, "ServerError" if status >= 500 else f"HTTP{status}")
    return ServingError(
        kind, f"HTTP {status}: {message}", transient=status in _TRANSIENT_STATUS,
        retry_after=retry_after, status=status,
    )


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return str(getattr(exc, "message", exc))
