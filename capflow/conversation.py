"""Turning a row's conversation (LLaVA/ShareGPT ``from``/``value`` or OpenAI ``role``/``content``
turns) into chat messages, with each image attached to the turn it belongs to."""

from __future__ import annotations

from typing import Any

from capflow.errors import RowError

IMAGE_PLACEHOLDER = "<image>"

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


def _image_part(url: str, detail: str | None) -> dict[str, Any]:
    image_url: dict[str, Any] = {"url": url}
    if detail:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def build_messages(
    turns: list[dict[str, Any]],
    image_urls: list[str],
    system_prompt: str | None = None,
    image_detail: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for ``turns``, with ``image_urls`` attached.

    An ``<image>`` placeholder in a turn is replaced by the next image, in order; images left
    over go at the start of the first user turn. Every turn keeps its role, whatever the last
    turn is.
    """
    parsed = [_parse_turn(n, turn) for n, turn in enumerate(turns)]
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in parsed)
    if placeholders > len(image_urls):
        raise RowError(
            "ImageCountMismatch",
            f"conversation has {placeholders} {IMAGE_PLACEHOLDER} placeholders "
            f"but the row has {len(image_urls)} images",
        )
    first_user = next((n for n, (role, _) in enumerate(parsed) if role == "user"), None)
    if first_user is None and len(image_urls) > placeholders:
        raise RowError("NoUserTurn", "conversation has no human/user turn to attach images to")

    leftovers = image_urls[placeholders:]
    next_image = 0
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for n, (role, text) in enumerate(parsed):
        if role == "system" and messages and messages[-1]["role"] == "system":
            # One system message: many chat templates refuse two in a row.
            messages[-1]["content"] += "\n\n" + text.strip()
            continue
        parts: list[dict[str, Any]] = []
        if n == first_user:
            parts += [_image_part(url, image_detail) for url in leftovers]
        pieces = text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k:
                parts.append(_image_part(image_urls[next_image], image_detail))
                next_image += 1
            piece = piece.strip()
            if piece:
                parts.append({"type": "text", "text": piece})
        has_image = any(p["type"] == "image_url" for p in parts)
        if has_image and role != "user":
            raise RowError(
                "BadConversation",
                f"conversation turn {n + 1} ({role}) holds an {IMAGE_PLACEHOLDER}: "
                "images can only go in user turns",
            )
        if has_image:
            messages.append({"role": role, "content": parts})
        else:
            # Plain text keeps assistant and system turns valid for every server.
            messages.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
    return messages


def _parse_turn(n: int, turn: Any) -> tuple[str, str]:
    if not isinstance(turn, dict):
        raise RowError("BadConversation", f"conversation turn {n + 1} is not an object: {turn!r}")
    speaker = turn.get("from", turn.get("role"))
    role = _ROLES.get(str(speaker).lower()) if speaker is not None else None
    if role is None:
        raise RowError("BadConversation", f"conversation turn {n + 1} has unknown role {speaker!r}")
    text = turn.get("value", turn.get("content", ""))
    if not isinstance(text, str):
        raise RowError("BadConversation", f"conversation turn {n + 1} text is not a string")
    return role, text
