"""The fake OpenAI server's answer to a chat-completions request: the images' descriptions
joined by ``"; "`` (or an object of the asked schema's shape), sent whole or streamed as
server-sent events, with token counts a test can predict."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from capflow.testing.chat_request import RecordedRequest
from capflow.testing.fake_answers import asked_schema, fake_object

TOKENS_PER_IMAGE = 85


def answer_text(rec: RecordedRequest, *, cut_short: bool = False) -> str:
    """The answer's text: the image descriptions, or a structured answer as JSON when the
    request asks for one (``cut_short``: only its first half, as the ``bad_json`` fault
    sends it)."""
    answer = "; ".join(rec.images) if rec.images else "no image"
    schema = asked_schema(rec.params, rec.system)
    if schema is not None:
        answer = json.dumps(fake_object(schema, answer))
        if cut_short:
            answer = answer[: len(answer) // 2]
    return answer


def completion(model: str, rec: RecordedRequest, answer: str, number: int, *,
               empty: bool = False) -> dict[str, Any]:
    """A ``chat.completion`` object answering ``rec`` with ``answer``; ``number`` makes its id,
    ``empty`` leaves out its choices. Prompt tokens are the words of the texts and system
    prompt plus :data:`TOKENS_PER_IMAGE` an image; completion tokens the answer's words."""
    words = sum(len(t.split()) for _, t in rec.texts) + len((rec.system or "").split())
    prompt_tokens = words + TOKENS_PER_IMAGE * len(rec.images)
    completion_tokens = len(answer.split())
    choice = {"index": 0, "message": {"role": "assistant", "content": answer},
              "finish_reason": "stop", "logprobs": None}
    return {
        "id": f"chatcmpl-capflow{number:08d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if empty else [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


async def stream(request: web.Request, completion: dict[str, Any]) -> web.StreamResponse:
    """Send ``completion`` as server-sent events: one chunk per word, then usage."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {k: completion[k] for k in ("id", "created", "model")} | {
        "object": "chat.completion.chunk"
    }
    for choice in completion["choices"]:
        words = choice["message"]["content"].split(" ")
        for n, word in enumerate(words):
            delta = {"content": word if n == 0 else " " + word}
            chunk = base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        end = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
        await response.write(f"data: {json.dumps(base | {'choices': [end]})}\n\n".encode())
    usage = base | {"choices": [], "usage": completion["usage"]}
    await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response
