"""A request to a serving and its response: plain data, so that retries, caching, rate limits
and concurrency can each live in one place and a plugin serving stays small."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Request:
    """One chat-completions request, as an operator prepared it for one row.

    :param messages: OpenAI-style chat messages; images are ``image_url`` content parts.
    :param image_bytes: bytes of image data the request carries (for reports and dry runs).
    :param image_count: how many images the request carries.
    :param estimated_tokens: prompt tokens expected (for rate limits), before the answer.
    :param image_tokens: the part of ``estimated_tokens`` that the images cost.
    :param body: more request-body fields the operator asks for (``response_format``, say);
        a serving sends them with the messages, and the serving's ``extra_body`` wins.
    """

    messages: list[dict[str, Any]]
    image_bytes: int = 0
    image_count: int = 0
    estimated_tokens: int = 0
    image_tokens: int = 0
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    """Token counts the server reported; both zero when it reported none (capflow then
    estimates them for budgets and the summary)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class Response:
    """What a serving returns for one request.

    :param text: the answer's text (text parts joined; ``""`` when there is none).
    :param finish_reason: why the answer ended (``stop``, ``length``, ``content_filter``, ...).
    :param refusal: the model's refusal message, when it refused instead of answering.
    :param rate_limits: what the server's rate-limit headers said, when it sent them
        (a ``capflow.serving.ratelimit_headers.RateLimitInfo``).
    """

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    model: str | None = None
    refusal: str | None = None
    rate_limits: Any = None
