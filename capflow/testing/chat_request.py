"""Reading a chat-completions request as the fake OpenAI server does: the checks that refuse a
malformed one (with OpenAI's status and message), and the record a test reads afterwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from capflow.testing.api_errors import ApiError


@dataclass
class RecordedRequest:
    """What the server saw of one chat-completions request, and how it answered.

    ``status`` is 0 when the connection was reset, 499 when the client went away.
    """

    model: str | None = None
    system: str | None = None
    texts: list[tuple[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    fault: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    received_at: float = 0.0  # time.monotonic() when the request arrived


async def read_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; a 400 ``ApiError`` for anything else."""
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def read_chat(body: dict[str, Any], rec: RecordedRequest) -> tuple[str, list[Any]]:
    """Check a chat-completions body and return its model and messages, recording in ``rec``
    the model, whether it streams, and its other fields (generation parameters, passthrough
    fields)."""
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str):
        raise ApiError(400, "Missing or invalid 'model': expected a string.")
    rec.model = model
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.")
    rec.stream = bool(body.get("stream"))
    rec.params = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
    return model, messages


def parse_messages(messages: list[Any], rec: RecordedRequest) -> list[str]:
    """Fill ``rec.system``/``rec.texts``; return image URLs in order."""
    system: list[str] = []
    urls: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ApiError(400, f"Invalid messages[{i}]: expected an object with a 'role'.")
        role = msg["role"]
        for part in _content_parts(msg.get("content"), i):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype == "text" and isinstance(part.get("text"), str):
                if role in ("system", "developer"):
                    system.append(part["text"])
                else:
                    rec.texts.append((role, part["text"]))
            elif ptype == "image_url":
                urls.append(_image_url(part.get("image_url"), i))
            elif not isinstance(part, dict):
                raise ApiError(400, f"Invalid content part in messages[{i}].")
    rec.system = "\n".join(system) if system else None
    return urls


def _content_parts(content: Any, i: int) -> list[Any]:
    """A message's content as a list of parts (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    if content is None:
        return []
    raise ApiError(400, f"Invalid type for messages[{i}].content.")


def _image_url(image: Any, i: int) -> str:
    """The URL of an ``image_url`` part: ``{"url": ...}``, or the bare string some clients
    send."""
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise ApiError(400, f"Invalid image_url in messages[{i}].")
    return url
