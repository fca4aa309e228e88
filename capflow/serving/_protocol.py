"""What the transports share of the chat-completions protocol: how HTTP failures become
``ServingError``s (so retries and stop rules see the same kinds whichever transport is used),
and how a streamed answer is put back together."""

from __future__ import annotations

import json
from typing import Any

from capflow.errors import ServingError
from capflow.request import Response, Usage

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


def decode_answer(status: int, reason: str, body: bytes, retry_after: str | None) -> Any:
    """The JSON of an answer; a ``ServingError`` for an error status or an unreadable body."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
        if status < 400:
            raise ServingError("BadResponse", "response body is not JSON",
                               transient=True) from None
    if status >= 400:
        fallback = body[:200].decode(errors="replace") or reason or ""
        raise status_error(status, server_message(data, fallback), retry_after)
    return data


class StreamedAnswer:
    """Joins the chunks of a streamed chat completion into one ``Response``; a stream that
    breaks off, carries an error or holds no answer is an error, never a caption."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.usage = Usage()
        self.finish: str | None = None
        self.model: str | None = None
        self.done = False  # the server said [DONE]

    def add(self, chunk: Any) -> None:
        """Take in one ``chat.completion.chunk`` object."""
        if not isinstance(chunk, dict):
            raise ServingError("BadResponse", "stream chunk is not a JSON object", transient=True)
        if chunk.get("error"):
            message = server_message(chunk, "error in the stream")
            raise ServingError("StreamError", f"the stream carried an error: {message}",
                               transient=True)
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            u = chunk["usage"]
            self.usage = Usage(u.get("prompt_tokens") or 0, u.get("completion_tokens") or 0)
        choices = chunk.get("choices") or ()
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, dict) for c in choices):
            raise ServingError("BadResponse", "stream chunk has malformed choices",
                               transient=True)
        for choice in choices:
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if content:
                self.parts.append(content)
            self.finish = choice.get("finish_reason") or self.finish

    def add_line(self, raw: bytes) -> None:
        """Take in one line of a server-sent event stream (``data: {...}``, ``data: [DONE]``;
        other lines are ignored)."""
        line = raw.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ServingError("BadResponse", f"unreadable stream chunk: {exc}",
                               transient=True) from None
        self.add(chunk)

    def response(self) -> Response:
        """The whole answer."""
        if not (self.done or self.finish):
            raise ServingError("BadResponse", "the stream ended before the answer did",
                               transient=True)
        if not self.parts:
            raise ServingError("EmptyAnswer", f"answer has no text (finish_reason={self.finish})",
                               transient=False)
        return Response("".join(self.parts), self.usage, self.finish, self.model)
