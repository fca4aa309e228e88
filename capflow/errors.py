"""Errors capflow raises, each with a one-line message that says what is wrong and where."""

from __future__ import annotations

from typing import Any


class CapflowError(Exception):
    """Base class for capflow's own errors."""


class ConfigError(CapflowError):
    """The configuration is wrong (an option, a value, a missing setting)."""


class PluginError(CapflowError):
    """A plugin is invalid or clashes with another."""


class RowError(CapflowError):
    """One row cannot be processed; the row gets an error record and the run goes on.

    :param kind: a short stable name for the failure (``ImageNotFound``, ``BadRequest``, ...).
    :param stage: where it happened: ``prepare`` (no request was sent) or ``request``.
    """

    def __init__(self, kind: str, message: str, stage: str = "prepare") -> None:
        super().__init__(message)
        self.kind = kind
        self.stage = stage

    def record(self) -> dict[str, str]:
        """The error record written into the failed row."""
        return {"type": self.kind, "message": str(self), "stage": self.stage}


class ServingError(CapflowError):
    """A request failed. ``transient`` failures are retried; the others fail the row at once.

    :param retry_after: seconds the server asked us to wait (``Retry-After``), if it said.
    :param status: the HTTP status, when there was one.
    :param rate_limits: what the server's rate-limit headers said, when it sent them
        (a ``capflow.serving.ratelimit_headers.RateLimitInfo``).

    ``counted`` is set to False by capflow when the failure was an outage's rather than the
    request's own: it then does not use up one of the row's attempts.
    """

    counted = True

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        status: int | None = None,
        rate_limits: Any = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.transient = transient
        self.retry_after = retry_after
        self.status = status
        self.rate_limits = rate_limits
        self.counted = True
