"""The transport contract: how ``OpenAIServing`` talks HTTP to a chat-completions API.

A transport sends one request and returns the parsed answer, or raises a ``ServingError`` whose
``kind`` is the same whichever transport is used: retries, the adaptive sender and the stop
rules only ever see kinds. Every transport passes one conformance suite
(``tests/test_transport_conformance.py``), hostile servers included, and keeps the same limits:

- ``timeout`` bounds the whole request, from connecting to the last byte of the answer;
- answers larger than ``max_response_bytes`` (before or after decompression) are refused;
- response headers are limited in size and number;
- redirects are never followed (the key must not travel to another origin): a 3xx is an error
  naming where the server points;
- a certificate that does not verify is an error at once, saying how to trust a private CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from capflow.errors import ServingError
from capflow.request import Response
from capflow.redaction import clean_message

MAX_HEADER_BYTES = 64 * 1024  # all response headers together
MAX_HEADER_COUNT = 100


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
    ``(api_url: str, key: str | None, options: TransportOptions)``."""

    async def list_models(self) -> list[str]:
        """The ids the server's ``/models`` lists."""
        ...

    async def chat(self, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/chat/completions``; the answer's parsed JSON."""
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


def tls_error(host: str, port: int, reason: object) -> ServingError:
    """The error for a certificate that does not verify: not transient, with the way out."""
    return ServingError(
        "TLSError",
        f"TLS certificate check failed for {host}:{port}: {clean_message(reason, 200)};"
        " to trust a private CA, set serving.ca_file=/path/to/ca.pem"
        " (or the SSL_CERT_FILE environment variable)",
        transient=False,
    )


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
