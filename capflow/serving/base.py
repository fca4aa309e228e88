"""The serving interface: one request in, one response out.

Retries, rate limits, caching and concurrency live in the engine, so a serving only has to
send one request and say how it failed (``capflow.errors.ServingError``, transient or not).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from capflow.request import Request, Response


class Serving(ABC):
    """Answers chat-completions requests.

    :param max_workers: how many requests the engine keeps in flight for this serving.
    """

    max_workers: int = 10

    def unavailable(self) -> str | None:
        """Why this serving cannot send requests as configured, or None when it can. capflow
        then runs a dry run instead and tells the user what to set."""
        return None

    async def start(self) -> None:
        """Open clients and connections. Called on the engine's event loop before any request;
        raise ``capflow.errors.ConfigError`` for settings that cannot work."""

    @abstractmethod
    async def complete(self, request: Request) -> Response:
        """Send one request and return its response.

        Send ``request.body``'s fields (``response_format`` for a structured answer, say) with
        ``request.messages``. Raise ``capflow.errors.ServingError`` on failure, with
        ``transient=True`` for failures worth retrying (rate limits, server errors, timeouts,
        dropped connections).
        """

    async def close(self) -> None:
        """Release what ``start`` opened."""

    def describe(self) -> dict[str, Any]:
        """What determines the answers (model, generation parameters), never secrets."""
        return {"serving": type(self).__name__}
