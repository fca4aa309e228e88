"""Writing finished rows as WebDataset tar shards, sample by sample.

Each row becomes one sample under its ``key``: the image, decoded back from the row's
``data:`` URI, as ``KEY.jpg`` (or ``.png``, ``.webp``, ...), every other field as
``KEY.json`` (the original metadata and the new fields together) and the caption as
``KEY.txt``. A failed row keeps its image and its ``_error`` record in ``KEY.json``, and has
no ``KEY.txt``; a row with no key (a sample that could not be read) is written as
``_failed_<position>.json``, so that nothing is lost.
"""

from __future__ import annotations

import itertools
import json
import tarfile
import time
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

from capflow import CapflowError
from capflow_webdataset.atomic import replace_file
from capflow_webdataset.datauri import from_data_uri
from capflow_webdataset.outputs import shard_output
from capflow_webdataset.shards import shard_stem

#: The field of a failed row's error record (capflow's).
ERROR_KEY = "_error"


def sample_members(row: dict[str, Any], position: int, image_key: str,
                   caption_key: str) -> tuple[str, list[tuple[str, bytes]]]:
    """The key and the ``(extension, bytes)`` members of the sample row number ``position``
    (0-based) becomes."""
    key = row.get("key")
    if not isinstance(key, str) or not key:
        key = f"_failed_{position:06d}"
    members: list[tuple[str, bytes]] = []
    metadata = row
    image = from_data_uri(row.get(image_key))
    if image is not None:
        data, ext = image
        members.append((ext, data))
        metadata = {k: v for k, v in row.items() if k != image_key}
    members.append(("json", json.dumps(metadata, ensure_ascii=False).encode("utf-8")))
    caption = row.get(caption_key)
    if caption is not None and ERROR_KEY not in row:
        text = caption if isinstance(caption, str) else json.dumps(caption, ensure_ascii=False)
        members.append(("txt", text.encode("utf-8")))
    return key, members


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    """Append the file ``name`` holding ``data`` to ``tar``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, BytesIO(data))


def write_tar(rows: Iterable[tuple[int, dict[str, Any]]], file: BinaryIO | Path,
              image_key: str, caption_key: str) -> None:
    """Write ``(position, row)`` pairs as the samples of one tar file (a path, or a binary file
    that stays open), each as it comes: nothing is held."""
    mtime = int(time.time())
    named = isinstance(file, Path)
    with tarfile.open(name=file if named else None, fileobj=None if named else file,
                      mode="w", format=tarfile.PAX_FORMAT) as tar:
        for position, row in rows:
            key, members = sample_members(row, position, image_key, caption_key)
            for ext, data in members:
                add_member(tar, f"{key}.{ext}", data, mtime)


def shard_groups(rows: Iterable[dict[str, Any]], samples_per_shard: int | None, first: str,
                 ) -> Iterator[tuple[str, Iterator[tuple[int, dict[str, Any]]]]]:
    """The rows split into output shards, streamed: ``(name, (position, row) pairs)``.

    With ``samples_per_shard``, shards are numbered ``000000``, ``000001``, ... and hold that
    many rows each. Without, each row goes to the shard named after its input shard (the
    ``shard`` field, less ``.tar``); a row without one (a sample that could not be read) goes
    with the row before it, or, at the start, to ``first``.
    """

    def named() -> Iterator[tuple[str, int, dict[str, Any]]]:
        current = first
        for position, row in enumerate(rows):
            if samples_per_shard:
                current = f"{position // samples_per_shard:06d}"
            elif isinstance(row.get("shard"), str) and row["shard"]:
                current = shard_stem(row["shard"])
            yield current, position, row

    for name, group in itertools.groupby(named(), key=lambda item: item[0]):
        yield name, ((position, row) for _, position, row in group)


def write_tar_shards(rows: Iterable[dict[str, Any]], pattern: str, samples_per_shard: int | None,
                     first: str, image_key: str, caption_key: str) -> list[Path]:
    """Write the rows as the shards of ``pattern`` (``out/{shard}.tar``), each replaced
    atomically as soon as its rows are written; returns the shards written."""
    written: dict[Path, None] = {}
    for name, group in shard_groups(rows, samples_per_shard, first):
        path = shard_output(pattern, name)
        if path in written:  # the rows of one input shard are together, in input order
            raise CapflowError(f"cannot write {pattern}: the rows of {path.name} are not together")
        replace_file(path, lambda f, g=group: write_tar(g, f, image_key, caption_key))
        written[path] = None
    return list(written)
