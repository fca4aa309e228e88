"""The reference client: what a plain script would do, for comparison with capflow.

A ``ThreadPoolExecutor`` of ``--workers`` threads over the official ``openai`` SDK's sync
client: read the JSON dataset, base64-encode each row's images, ask, and write JSON Lines at
the end (each input row plus ``caption``). No cache, no journal, no retries of its own.

    python -m benchmarks.reference --input data.json --output out.jsonl \\
        --api-url http://127.0.0.1:8000/v1 --model m --workers 256
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai


def image_part(path: Path) -> dict[str, Any]:
    """An ``image_url`` content part carrying the file as a base64 ``data:`` URI."""
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def messages_for(row: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """One user message: the row's images, then its first question."""
    images = [image_part(base / ref) for ref in row["image"]]
    question = row["conversation"][0]["value"]
    return [{"role": "user", "content": [*images, {"type": "text", "text": question}]}]


def main(argv: list[str] | None = None) -> int:
    """Caption every row of ``--input`` into ``--output``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference", description=__doc__)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--api-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)

    rows = json.loads(args.input.read_text())
    base = args.input.resolve().parent
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(
        max_connections=args.workers, max_keepalive_connections=args.workers)
    client = openai.OpenAI(
        base_url=args.api_url, api_key="no-key", timeout=args.timeout,
        http_client=openai.DefaultHttpxClient(limits=limits, timeout=args.timeout),
    )

    def caption(row: dict[str, Any]) -> str:
        completion = client.chat.completions.create(
            model=args.model, messages=messages_for(row, base))
        return completion.choices[0].message.content or ""

    with ThreadPoolExecutor(args.workers) as pool:
        captions = list(pool.map(caption, rows))
    with open(args.output, "w", encoding="utf-8") as f:
        for row, text in zip(rows, captions, strict=True):
            f.write(json.dumps({**row, "caption": text}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
