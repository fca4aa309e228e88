"""How HTTP failures of an OpenAI-compatible API become ``ServingError``s (shared by both
transports, so that retries and stop rules see the same kinds whichever one is used)."""

from __future__ import annotations

from typing import Any

from capflow.errors import ServingError

# Statuses worth another try: rate limits, timeouts and server-side failures.
TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_KINDS = {
    400: "BadRequest", 401: "AuthenticationError", 403: "PermissionDenied",
    404: "NotFound", 422: "Unprocessable", 429: "RateLimited",
}


def server_message(body: Any, fallback: str) -> str:
    """The human message in an OpenAI-style error body (``{"error": {"message": ...}}``)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return fallback


def status_error(status: int, message: str, retry_after: str | None) -> ServingError:
    """The ``ServingError`` for an HTTP error status."""
    wait = None
    if retry_after:
        try:
            wait = max(0.0, float(retry_after))
        except ValueError:
            wait = None
    kind = _KINDS.get(status, "ServerError" if status >= 500 else f"HTTP{status}")
    return ServingError(kind, f"HTTP {status}: {message}", transient=status in TRANSIENT_STATUS,
                        retry_after=wait, status=status)
