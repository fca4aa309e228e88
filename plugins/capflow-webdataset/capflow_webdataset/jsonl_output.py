"""Writing finished rows as JSON Lines without their images.

Embedded images would make the file as large as the dataset; each row's ``data:`` URI is
replaced by a reference to the member it came from, ``000000.tar/KEY.jpg`` (the input shard's
file name, then the member's name), so that the lines stay small and still say which image each
caption is of.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from capflow_webdataset.datauri import data_uri_ext


def image_reference(row: dict[str, Any], image_key: str) -> Any:
    """What the JSON Lines row holds for its image: ``SHARD/KEY.EXT`` in place of a ``data:``
    URI when the row says its shard and key; the field as it is otherwise."""
    image = row.get(image_key)
    ext = data_uri_ext(image)
    shard, key = row.get("shard"), row.get("key")
    if ext is None or not isinstance(shard, str) or not isinstance(key, str):
        return image
    return f"{shard}/{key}.{ext}"


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path, image_key: str) -> None:
    """Write one JSON object per line, each image as a reference into its shard."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            if image_key in row:
                row = {**row, image_key: image_reference(row, image_key)}
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
