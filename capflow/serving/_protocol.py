"""What the transports share of the chat-completions protocol: how HTTP failures become
``ServingError``s (so retries and stop rules see the same kinds whichever transport is used),
how a body is read within ``max_response_bytes``, and how an answer, plain or streamed, becomes
a ``Response``.

Every message built from server text goes through ``clean_message``; answer text and refusals
go through ``redact`` (captions keep their line breaks)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

from capflow.errors import ServingError
from capflow.redaction import clean_message, redact
from capflow.request import Response, Usage
from capflow.serving.ratelimit_headers import RateLimitInfo, rate_limit_info, retry_after
from capflow.serving.transport import too_large

#: Looks a response header up by its lower-case name.
HeaderGetter = Callable[[str], "str | None"]

# Statuses worth another try: rate limits, timeouts and server-side failures.
TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_KINDS = {
    400: "BadRequest", 401: "AuthenticationError", 403: "PermissionDenied",
    404: "NotFound", 422: "Unprocessable", 429: "RateLimited",
}
_TEXT_PARTS = ("text", "output_text")


def _no_headers(name: str) -> str | None:
    return None


def server_message(body: Any, fallback: str) -> str:
    """The human message in an OpenAI-style error body (``{"error": {"message": ...}}``)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return fallback


def _error_code(body: Any) -> str | None:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("code") or err.get("type") or "") or None
    return None


def status_error(status: int, message: str, get: HeaderGetter = _no_headers,
                 body: Any = None) -> ServingError:
    """The ``ServingError`` for an HTTP error status, with what the rate-limit headers say."""
    kind = _KINDS.get(status, "ServerError" if status >= 500 else f"HTTP{status}")
    transient = status in TRANSIENT_STATUS
    if status == 429 and _error_code(body) == "insufficient_quota":
        kind, transient = "QuotaExceeded", False  # waiting does not bring money back
    return ServingError(kind, clean_message(f"HTTP {status}: {message}"), transient=transient,
                        retry_after=retry_after(get), status=status,
                        rate_limits=rate_limit_info(get))


def decode_answer(status: int, reason: str, body: bytes, get: HeaderGetter = _no_headers) -> Any:
    """The JSON of an answer; a ``ServingError`` for an error status or an unreadable body."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
        if status < 400:
            raise ServingError("BadResponse", "response body is not JSON", transient=True,
                               rate_limits=rate_limit_info(get)) from None
    if status >= 400:
        fallback = body[:200].decode(errors="replace") or reason or ""
        raise status_error(status, server_message(data, fallback), get, data)
    return data


def answer(status: int, reason: str, body: bytes, get: HeaderGetter) -> Response:
    """The ``Response`` of a plain (not streamed) chat-completions answer."""
    return parse_completion(decode_answer(status, reason, body, get), rate_limit_info(get))


def model_ids(data: Any) -> list[str]:
    """The ids in a ``/models`` answer."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ServingError("BadResponse", "/models did not answer a model list", transient=False)
    return [str(m["id"]) for m in data["data"] if isinstance(m, dict) and "id" in m]


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _usage(value: Any) -> Usage:
    if not isinstance(value, dict):
        return Usage()
    return Usage(_count(value.get("prompt_tokens")), _count(value.get("completion_tokens")))


def _content(content: Any, refusals: list[str]) -> str:
    """The text of ``message.content``: a string, a list of parts (text parts joined, refusal
    parts set aside in ``refusals``) or None."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ServingError("BadResponse", "message content is neither text nor a list of parts",
                           transient=True)
    texts = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            refusals.append(part["refusal"])
    return "".join(texts)


def parse_completion(data: Any, rate_limits: RateLimitInfo | None = None) -> Response:
    """A ``Response`` from a chat-completion JSON body. A body without choices is a transient
    error (an error object, as some servers send with status 200, is a ``ServerError``); an
    answer without text is ``Response(text="")``, for the engine to judge."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices:
        if isinstance(data, dict) and data.get("error"):
            detail = server_message(data, "an error object")
            raise ServingError("ServerError",
                               clean_message(f"the server answered 200 with an error: {detail}"),
                               transient=True, rate_limits=rate_limits)
        raise ServingError("BadResponse", "response has no choices", transient=True,
                           rate_limits=rate_limits)
    choice = choices[0] if isinstance(choices, list) else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        raise ServingError("BadResponse", "response has a malformed choice", transient=True,
                           rate_limits=rate_limits)
    refusals: list[str] = []
    text = _content(message.get("content"), refusals)
    if isinstance(message.get("refusal"), str):
        refusals.insert(0, message["refusal"])
    model = data.get("model")
    return Response(
        text=redact(text),
        usage=_usage(data.get("usage")),
        finish_reason=choice.get("finish_reason"),
        model=model if isinstance(model, str) else None,
        refusal=redact("".join(refusals)) if refusals else None,
        rate_limits=rate_limits,
    )


class CappedBody:
    """Reads a body within ``limit`` bytes, received and decompressed alike: a gzip bomb is
    inflated only as far as the limit, never whole.

    :param encoding: the ``Content-Encoding`` (gzip, deflate, identity or none).
    """

    __slots__ = ("limit", "received", "decoded", "_unpack")

    def __init__(self, limit: int, encoding: str | None) -> None:
        self.limit = limit
        self.received = 0
        self.decoded = 0
        encoding = (encoding or "").strip().lower()
        if encoding in ("", "identity"):
            self._unpack: Any = None
        elif encoding in ("gzip", "x-gzip"):
            self._unpack = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._unpack = zlib.decompressobj(32 + zlib.MAX_WBITS)  # zlib or gzip framing
        else:
            raise ServingError("BadResponse", "the answer has an unsupported Content-Encoding:"
                               f" {clean_message(encoding, 40)}", transient=True)

    @property
    def compressed(self) -> bool:
        return self._unpack is not None

    def feed(self, data: bytes) -> bytes:
        """Count ``data`` as received, and return it decompressed."""
        self.received += len(data)
        if self.received > self.limit:
            raise too_large(self.limit)
        return self.decompress(data) if self._unpack is not None else data

    def decompress(self, data: bytes) -> bytes:
        """``data`` decompressed, at most as far as the limit allows (an error past it)."""
        if self._unpack is None:
            return data
        unpack = self._unpack
        return self._count(lambda room: unpack.decompress(data, room))

    def finish(self) -> bytes:
        """What the decompressor still holds."""
        if self._unpack is None:
            return b""
        unpack = self._unpack
        return self._count(lambda room: unpack.flush(room))

    def _count(self, inflate: Callable[[int], bytes]) -> bytes:
        # One byte more than the room left: enough to tell an answer past the limit.
        try:
            out = inflate(self.limit - self.decoded + 1)
        except zlib.error as exc:
            raise ServingError("BadResponse", f"cannot decompress the answer: {exc}",
                               transient=True) from None
        self.decoded += len(out)
        if self.decoded > self.limit:
            raise too_large(self.limit)
        return out


class StreamedAnswer:
    """Joins the chunks of a streamed chat completion into one ``Response``. A stream that
    breaks off, carries an error or no choice at all is an error, never a caption; a stream
    whose answer has no text is ``Response(text="")``.

    A server that ignores ``stream: true`` and answers one JSON object (``json_body=True``, from
    its Content-Type) is read as a plain answer."""

    def __init__(self, json_body: bool = False) -> None:
        self.parts: list[str] = []
        self.refusals: list[str] = []
        self.usage = Usage()
        self.finish: str | None = None
        self.model: str | None = None
        self.done = False  # the server said [DONE]
        self.choices = False  # some chunk carried a choice
        self.json_body = json_body
        self._buffer = bytearray()

    def add(self, chunk: Any) -> None:
        """Take in one ``chat.completion.chunk`` object."""
        if not isinstance(chunk, dict):
            raise ServingError("BadResponse", "stream chunk is not a JSON object", transient=True)
        if chunk.get("error"):
            message = server_message(chunk, "error in the stream")
            raise ServingError("StreamError",
                               clean_message(f"the stream carried an error: {message}"),
                               transient=True)
        if isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        choices = chunk.get("choices") or ()
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, dict) for c in choices):
            raise ServingError("BadResponse", "stream chunk has malformed choices",
                               transient=True)
        for choice in choices:
            self.choices = True
            delta = choice.get("delta") or {}
            if isinstance(delta, dict):
                content = delta.get("content")
                if content:
                    self.parts.append(content if isinstance(content, str)
                                      else _content(content, self.refusals))
                if isinstance(delta.get("refusal"), str):
                    self.refusals.append(delta["refusal"])
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

    def feed(self, data: bytes) -> None:
        """Take in the next bytes of the (decompressed) body, lines split wherever."""
        buffer = self._buffer
        buffer += data  # a bytearray: growing it is linear, whatever the line lengths
        if not self.json_body and b"\n" in data:
            cut = buffer.rfind(b"\n")
            for raw in bytes(buffer[:cut]).split(b"\n"):
                self.add_line(raw)
            del buffer[: cut + 1]

    def response(self, rate_limits: RateLimitInfo | None = None) -> Response:
        """The whole answer."""
        if self.json_body:
            return parse_completion(_json(bytes(self._buffer)), rate_limits)
        if self._buffer.strip():
            self.add_line(bytes(self._buffer))
            self._buffer.clear()
        if not (self.done or self.finish):
            raise ServingError("BadResponse", "the stream ended before the answer did",
                               transient=True, rate_limits=rate_limits)
        if not self.choices:
            raise ServingError("BadResponse", "the stream carried no choices", transient=True,
                               rate_limits=rate_limits)
        return Response(redact("".join(self.parts)), self.usage, self.finish, self.model,
                        redact("".join(self.refusals)) if self.refusals else None, rate_limits)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ServingError("BadResponse", "response body is not JSON", transient=True) from None
