"""The fake OpenAI server's refusals, in OpenAI's ``{"error": {...}}`` shape."""

from __future__ import annotations

from aiohttp import web


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    type_: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-style ``{"error": {...}}`` JSON response."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class ApiError(Exception):
    """Raised by a request's checks; the handler answers with :meth:`response`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers

    def response(self) -> web.Response:
        """The error response this refusal is sent as."""
        return error_response(self.status, self.message, self.code, headers=self.headers)
