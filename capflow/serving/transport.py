"""The transport contract: how ``OpenAIServing`` talks HTTP to a chat-completions API.

A transport sends one request and returns the answer, or raises a ``ServingError`` whose
``kind`` is the same whichever transport is used: retries, the adaptive sender and the stop
rules only ever see kinds. Every transport passes one conformance suite
(``tests/test_transport_conformance.py``), hostile servers included, and keeps the same limits:

- ``timeout`` bounds the whole request, from connecting to the last byte of the answer;
- answers larger than ``max_response_bytes`` (before or after decompression) are refused;
- response headers are limited in size and number;
- redirects are never followed (the key must not travel to another origin): a 3xx is an error
  naming where the server points;
- a certificate that does not verify is an error at once, saying how to trust a private CA;
- nothing the server sends (cookies, redirect targets) goes back into a request.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

from capflow.errors import ConfigError, ServingError
from capflow.redaction import add_secret, clean_message
from capflow.request import Response

if TYPE_CHECKING:
    import ssl

MAX_HEADER_BYTES = 64 * 1024  # all response headers together
MAX_HEADER_COUNT = 100

T = TypeVar("T")


@dataclass(frozen=True)
class TransportOptions:
    """Settings every transport honours.

    :param timeout: seconds for a whole request, connection and answer included.
    :param connections: the most connections kept open (the ceiling of requests in flight).
    :param max_response_bytes: the largest answer accepted, compressed or decompressed.
    :param ca_file: a PEM file of certificate authorities to trust (besides the system's).
    """

    timeout: float = 60.0
    connections: int = 10
    max_response_bytes: int = 8 * 1024 * 1024
    ca_file: str | None = None


class Transport(Protocol):
    """One client of a chat-completions API. Built with
    ``(api_url: str, key: str | None, options: TransportOptions)``; a key that cannot go into
    a header, or an unreadable ``ca_file``, is a ``ConfigError`` there."""

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        ...

    async def chat(self, body: dict[str, Any]) -> Response:
        """POST ``body`` to ``/chat/completions``; the answer, read by
        ``capflow.serving._protocol.parse_completion`` (rate-limit headers attached)."""
        ...

    async def chat_stream(self, body: dict[str, Any]) -> Response:
        """POST ``body`` with ``stream: true``; the answer joined from its events."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...


def too_large(limit: int) -> ServingError:
    """The error for an answer past ``max_response_bytes``."""
    return ServingError("ResponseTooLarge",
                        f"the answer is larger than serving.max_response_bytes={limit}",
                        transient=False)


def headers_too_large() -> ServingError:
    """The error for response headers past ``MAX_HEADER_BYTES`` or ``MAX_HEADER_COUNT``."""
    return ServingError("ResponseTooLarge",
                        f"the answer's headers are larger than {MAX_HEADER_BYTES} bytes"
                        f" or {MAX_HEADER_COUNT} fields", transient=False)


def tls_error(host: str, port: int, reason: object) -> ServingError:
    """The error for a certificate that does not verify: not transient, with the way out."""
    return ServingError(
        "TLSError",
        f"TLS certificate check failed for {host}:{port}: {clean_message(reason, 200)};"
        " to trust a private CA, set serving.ca_file=/path/to/ca.pem"
        " (or the SSL_CERT_FILE environment variable)",
        transient=False,
    )


def timeout_error(seconds: float) -> ServingError:
    """The error for a request that did not finish within ``timeout``."""
    return ServingError("Timeout", f"no answer within {seconds:g} s", transient=True)


def redirect_error(status: int, location: str | None, api_url: str) -> ServingError:
    """The error for a 3xx answer: capflow never follows redirects (the key would go along)."""
    if not location:
        return ServingError("Redirected", f"HTTP {status}: the server redirects (no Location);"
                            f" check api_url={api_url}", transient=False, status=status)
    target = clean_message(location, 300)
    base = target
    for suffix in ("/chat/completions", "/models"):
        if base.rstrip("/").endswith(suffix):
            base = base.rstrip("/")[: -len(suffix)]
    parts = urlsplit(base)
    if parts.scheme in ("http", "https") and parts.netloc:
        base = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))
    return ServingError(
        "Redirected",
        f"HTTP {status}: the server redirects to {target}; capflow does not follow redirects:"
        f" set api_url to {base}",
        transient=False,
        status=status,
    )


def endpoint_parts(api_url: str, key: str | None) -> SplitResult:
    """What every transport checks first: ``api_url`` is an http(s) URL with a host and a
    valid port (its parts are returned), and ``key`` can travel in a header (it is then
    registered, so that any text quoting it is redacted)."""
    parts = urlsplit(api_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"serving.api_url must be an http(s) URL, not {api_url!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ConfigError(f"serving.api_url has a bad port: {api_url!r}") from None
    check_key(key)
    add_secret(key)
    return parts


def check_key(key: str | None, source: str = "the API key") -> None:
    """Refuse a key that cannot travel in an HTTP header as it is: CR or LF would let it add
    headers of its own, and other control characters or non-latin-1 characters are mangled
    or refused on the way. The message names ``source`` (the environment variable), never
    the key."""
    if key and not all(" " <= c <= "~" or "\xa0" <= c <= "\xff" for c in key):
        raise ConfigError(f"{source} contains a line break, a control character or a character"
                          " outside latin-1, so it cannot be sent in a header: check its value")


def ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying TLS context: the system's CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR`` replace
    them, as OpenSSL does), plus those in ``ca_file``."""
    import ssl  # only TLS connections pay for it

    context = ssl.create_default_context()
    if ca_file:
        check_ca_file(ca_file)
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"serving.ca_file={ca_file!r} is not a PEM file of"
                              f" certificates: {clean_message(exc, 200)}") from None
    return context


def check_ca_file(ca_file: str | None) -> None:
    """A ``ConfigError`` naming ``serving.ca_file`` when it is set and cannot be read."""
    if ca_file and not (os.path.isfile(ca_file) and os.access(ca_file, os.R_OK)):
        raise ConfigError(f"serving.ca_file={ca_file!r} is not a readable file")


def proxy_for(api_url: str) -> str | None:
    """The HTTP proxy the environment (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``) sets for ``api_url``, or None. One rule for ``auto`` and for the clients
    that use proxies, so that the choice and the connection agree. Only http(s) proxies
    count: no client here speaks SOCKS."""
    if not any(name.lower().endswith("_proxy") and name.lower() != "no_proxy" and value
               for name, value in os.environ.items()):
        return None  # the usual case, without importing urllib.request (tens of ms at start)
    # proxy_bypass_environment is undocumented, so typeshed leaves it out.
    from urllib.request import (  # type: ignore[attr-defined]
        getproxies_environment,
        proxy_bypass_environment,
    )

    parts = urlsplit(api_url)
    proxies = getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or not parts.hostname or urlsplit(proxy).scheme not in ("http", "https"):
        return None
    host = parts.netloc.rsplit("@", 1)[-1]
    if proxy_bypass_environment(host, proxies):
        return None
    return proxy


async def within(seconds: float, work: Awaitable[T]) -> T:
    """``work``, abandoned with a ``Timeout`` error when it takes more than ``seconds``."""
    try:
        return await asyncio.wait_for(work, seconds)
    except asyncio.TimeoutError:
        raise timeout_error(seconds) from None
