"""OpenAIServing: any OpenAI-compatible chat-completions API."""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from capflow.errors import ConfigError, ServingError
from capflow.redaction import add_secret, clean_message
from capflow.request import Request, Response
from capflow.serving.base import Serving
from capflow.serving.transport import TransportOptions, check_key, proxy_for

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "http", "aiohttp", "sdk")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_KEY_REFUSED = ("AuthenticationError", "PermissionDenied")  # 401, 403
_VERSION = re.compile(r"v\d+\w*")  # a path segment like v1, v1beta, v2


class OpenAIServing(Serving):
    """Sends requests to an OpenAI-compatible ``/chat/completions`` endpoint.

    :param api_url: the API base URL, e.g. ``http://127.0.0.1:8000/v1``, or a list of them
        (servers of one model): each request goes to the one with the fewest in flight.
    :param key_name_of_api_key: the NAME of the environment variable holding the API key. When
        it is unset, requests go without a key (fine for local servers); only when the server
        answers 401 or 403 does an error say that the variable is not set.
    :param model_name: the model; when None, the server's only model (from ``/models``).
    :param max_workers: requests kept in flight.
    :param timeout: seconds one request may take before it is abandoned (and retried).
    :param temperature: sampling temperature (server default when None).
    :param max_tokens: cap on the answer's tokens.
    :param top_p: nucleus-sampling mass.
    :param seed: sampling seed, for servers that support it.
    :param extra_body: more JSON fields for the request body, passed through as they are.
    :param send_request_stream: receive the answer as a stream of chunks.
    :param transport: ``auto`` (the default): capflow's own client, or aiohttp when an HTTP
        proxy applies to ``api_url``; ``http``, capflow's own HTTP/1.1 client (least CPU per
        request, fastest start, no proxies); ``aiohttp``, a client on aiohttp (through the
        environment's proxy); or ``sdk``, the official ``openai`` SDK's async client.
    :param max_response_bytes: the largest answer accepted, before or after decompression.
    :param ca_file: a PEM file of certificate authorities to trust besides the system's (for
        a server whose certificate a private CA signed).
    """

    def __init__(
        self,
        api_url: str | list[str] | None,
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
        transport: str = "auto",
        max_response_bytes: int = 8 * 1024 * 1024,
        ca_file: str | None = None,
    ) -> None:
        if int(max_workers) < 1:
            raise ConfigError(f"max_workers must be at least 1, not {max_workers}")
        if float(timeout) <= 0:
            raise ConfigError(f"timeout must be positive, not {timeout}")
        if transport not in TRANSPORTS:
            raise ConfigError(f"serving.transport must be one of {TRANSPORTS}, not {transport!r}")
        if int(max_response_bytes) < 1024:
            raise ConfigError("serving.max_response_bytes must be at least 1024, not"
                              f" {max_response_bytes}")
        urls = list(api_url) if isinstance(api_url, (list, tuple)) else [api_url]
        #: Every endpoint requests are spread over (several servers of one model).
        self.api_urls = [str(u) for u in urls if u]
        self.api_url = self.api_urls[0] if self.api_urls else None
        for url in self.api_urls:
            if "@" in urlsplit(url).netloc:
                # It would go in every log line and saved config; the key has its own way in.
                raise ConfigError("api_url must not hold a user name or password: put the API"
                                  " key in the environment variable named by"
                                  " key_name_of_api_key")
        self.key_name_of_api_key = key_name_of_api_key
        self.model_name = model_name
        self.max_workers = int(max_workers)
        self.timeout = float(timeout)
        self.send_request_stream = bool(send_request_stream)
        self.transport = transport
        self.max_response_bytes = int(max_response_bytes)
        self.ca_file = str(ca_file) if ca_file else None
        params = {
            "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p, "seed": seed
        }
        self.params = {k: v for k, v in params.items() if v is not None}
        self.extra_body = dict(extra_body or {})
        self._client: Any = None  # the first endpoint's
        self._clients: list[Any] = []  # one per endpoint
        self._in_flight: list[int] = []  # requests in flight to each
        self._no_key: str | None = None  # why no key is sent, when none is

    def describe(self) -> dict[str, Any]:
        return {
            "serving": type(self).__name__,
            "model": self.model_name,
            "params": self.params,
            "extra_body": self.extra_body,
            "endpoint": (endpoint(self.api_urls[0]) if len(self.api_urls) == 1
                         else sorted(endpoint(u) for u in self.api_urls) or None),
        }

    def unavailable(self) -> str | None:
        if not self.api_url:
            return "no API endpoint is set"
        return None

    async def start(self) -> None:
        if not self.api_url:
            raise ConfigError("serving.api_url is not set (e.g. api_url=http://127.0.0.1:8000/v1)")
        key = os.environ.get(self.key_name_of_api_key) if self.key_name_of_api_key else None
        # No word about a missing key here: local servers need none. A 401 or 403 says it.
        self._no_key = None if key else _why_no_key(self.key_name_of_api_key, key)
        add_secret(key)
        check_key(key, f"the environment variable {self.key_name_of_api_key}")
        options = TransportOptions(timeout=self.timeout, connections=self.max_workers,
                                   max_response_bytes=self.max_response_bytes,
                                   ca_file=self.ca_file)
        transport = self._transport_class()
        self._clients = [transport(url, key, options) for url in self.api_urls]
        self._in_flight = [0] * len(self._clients)
        self._client = self._clients[0]
        if not self.model_name:
            try:
                self.model_name = await self._only_model()
            except BaseException:
                await self.close()
                raise

    def _transport_class(self) -> Any:
        """The transport's class; ``auto`` explains its choice in one line."""
        assert self.api_url is not None
        name = self.transport
        if name == "auto":
            if proxy_for(self.api_url):
                name = "aiohttp"
                log.info("serving.transport=auto: an HTTP proxy applies to %s, so requests go"
                         " through it with the aiohttp client", endpoint(self.api_url))
            else:
                name = "http"
                log.debug("serving.transport=auto: no HTTP proxy applies to %s, so requests go"
                          " with capflow's own HTTP client", endpoint(self.api_url))
        if name == "sdk":
            from capflow.serving._sdk_transport import SDKTransport

            return SDKTransport
        if name == "aiohttp":
            from capflow.serving._aiohttp_transport import AiohttpTransport

            return AiohttpTransport
        from capflow.serving._http_transport import HttpTransport

        return HttpTransport

    async def _only_model(self) -> str:
        try:
            models = await self._client.list_models()
        except ServingError as exc:
            models_url = f"{(self.api_url or '').rstrip('/')}/models"
            hint = self._hint(exc)
            if hint and exc.kind == "NotFound":  # the likelier mistake comes first
                raise ConfigError(f"{hint} ({models_url} answered {exc})") from None
            if exc.kind in _KEY_REFUSED and self._no_key:
                reason = str(exc).split(": ", 1)[-1]
                raise ConfigError(f"the server refused a request without an API key: {reason}:"
                                  f" {self._no_key}") from None
            if exc.kind == "AuthenticationError":
                reason = str(exc).split(": ", 1)[-1]
                raise ConfigError(f"the server refused the API key: {reason}") from None
            if exc.status is not None or exc.kind == "BadResponse":
                raise ConfigError(
                    f"model_name is not set and {self.api_url}/models answered {exc};"
                    " set model_name=..."
                ) from None
            raise ConfigError(f"cannot reach {self.api_url}: {exc}") from None
        if len(models) != 1:
            shown = clean_message(", ".join(models[:10]) or "none", 300)
            raise ConfigError(f"model_name is not set and the server offers {shown}: set one")
        log.info("model_name not set: using the server's only model, %s",
                 clean_message(models[0], 200))
        return models[0]

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients, self._client = [], None

    async def complete(self, request: Request) -> Response:
        body = {"model": self.model_name, "messages": request.messages, **self.params,
                **request.body, **self.extra_body}
        # Several endpoints: the one with the fewest requests in flight, so a slower server
        # gets fewer.
        n = min(range(len(self._clients)), key=self._in_flight.__getitem__)
        client = self._clients[n]
        self._in_flight[n] += 1
        try:
            if self.send_request_stream:
                return await client.chat_stream(body)
            # The transport reads the answer with _protocol.parse_completion, where the
            # rate-limit headers are at hand.
            return await client.chat(body)
        except ServingError as exc:
            hint = self._hint(exc)
            if hint:  # the row's error, and the stop message, say what to change
                exc.args = (f"{exc}: {hint}",)
            raise
        finally:
            self._in_flight[n] -= 1

    def _hint(self, exc: ServingError) -> str | None:
        """The setting that most likely explains a refusal, when one does: a key variable
        that is not set (401, 403), an ``api_url`` without its ``/v1`` (404)."""
        if exc.kind in _KEY_REFUSED:
            return self._no_key
        if exc.kind == "NotFound" and self.api_url:
            return v1_hint(self.api_url)
        return None


def _why_no_key(name: str | None, key: str | None) -> str:
    if not name:
        return "no API key is sent: key_name_of_api_key is not set"
    state = "is empty" if key is not None else "is not set"
    return f"the environment variable {name} {state} (key_name_of_api_key names it)"


def v1_hint(api_url: str) -> str | None:
    """For an ``api_url`` without a version in its path (``http://127.0.0.1:8000``), the
    ``/v1`` URL that OpenAI-compatible servers answer on; None when it has one."""
    parts = urlsplit(api_url)
    if any(_VERSION.fullmatch(segment) for segment in parts.path.split("/")):
        return None
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return f"api_url {api_url} does not end in /v1; did you mean {base}/v1?"


def endpoint(api_url: str) -> str:
    """``api_url`` normalised: scheme and host in lower case, no default port, no
    user:password, no trailing slash, no query (what identifies the server in caches and
    journals)."""
    parts = urlsplit(api_url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path.rstrip("/"), "", ""))
