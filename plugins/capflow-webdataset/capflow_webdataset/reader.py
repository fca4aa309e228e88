"""Reading tar shards as rows, one sample at a time.

A shard is read as a stream (``tarfile`` mode ``r|*``, compressed or not), front to back,
never whole: only the sample being gathered is in memory. Its members are grouped the
WebDataset way, by key: ``dir/000000012.jpg``, ``dir/000000012.json`` and ``dir/000000012.txt``
are the sample ``dir/000000012``, and a sample ends where the next key begins (img2dataset
writes each sample's members together).

A sample that cannot be used (no image, metadata that is not a JSON object, an image larger
than the cap) becomes a ``RowError`` in place of its row, so that it fails alone with the
reason; a shard that cannot be read on (cut short, corrupt) ends with one such error naming
where it broke, and the next shard is read.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capflow import RowError
from capflow_webdataset.datauri import to_data_uri

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma cannot open .tar.xz either
    LZMAError = OSError  # type: ignore[misc,assignment]

# What reading a damaged or cut-short shard raises.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, LZMAError)
# The largest .json or .txt member read: metadata and captions are small.
MAX_TEXT_BYTES = 16_000_000


def split_name(name: str) -> tuple[str, str] | None:
    """A member name's sample key and extension, the WebDataset way: the extension starts at
    the first dot of the file name (``a/b.seg.png`` is key ``a/b``, extension ``seg.png``).
    None for names without an extension and hidden files, which belong to no sample."""
    if name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


@dataclass
class _Sample:
    """The members of one sample gathered so far."""

    key: str
    image: tuple[bytes, str] | None = None
    metadata: bytes | None = None
    text: bytes | None = None
    problem: RowError | None = field(default=None)


@dataclass
class SampleReader:
    """Turns shards into rows: the sample's ``.json`` fields, then ``key``, ``shard`` (the tar's
    file name), ``txt`` (the ``.txt`` member, when there is one) and, under ``image_key``, the
    image as a ``data:`` URI.

    :param image_key: the row key of the image.
    :param image_exts: the extensions of image members (lower case); the first image member
        of a sample is its image, any other is left out.
    :param max_image_bytes: a larger image member fails its row unread (None: no cap).
    """

    image_key: str = "image"
    image_exts: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    max_image_bytes: int | None = None

    def rows(self, shards: Iterable[Path]) -> Iterator[dict[str, Any] | RowError]:
        """Every shard's rows, shard after shard, in member order."""
        for shard in shards:
            yield from self.shard_rows(shard)

    def shard_rows(self, shard: Path) -> Iterator[dict[str, Any] | RowError]:
        """One shard's rows, streamed; a ``RowError`` in place of each sample that cannot be
        used, and one at the end if the shard breaks off."""
        name = shard.name
        pending: _Sample | None = None
        with contextlib.ExitStack() as stack:
            try:
                tar = stack.enter_context(tarfile.open(shard, "r|*"))
            except _READ_ERRORS as exc:
                yield RowError("ShardUnreadable",
                               f"{name}: cannot read the shard: {_reason(exc)}")
                return
            try:
                while (member := tar.next()) is not None:
                    tar.members = []  # TarFile keeps every member it has read otherwise
                    parts = split_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key, ext = parts
                    if pending is None or key != pending.key:
                        if pending is not None:
                            yield self._row(pending, name)
                        pending = _Sample(key)
                    self._take(tar, member, ext.lower(), pending, name)
            except _READ_ERRORS as exc:
                yield _broken(name, pending, _reason(exc))
                return
            if not _ends_cleanly(tar, shard):
                yield _broken(name, pending, "cut short or garbled (no end-of-archive block"
                                             " after its last whole member)")
                return
        if pending is not None:
            yield self._row(pending, name)

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str,
              sample: _Sample, shard: str) -> None:
        """Read the member into ``sample`` if it is one the row needs (else it is skipped)."""
        if ext in self.image_exts:
            if sample.image is not None:
                return
            limit = self.max_image_bytes
            if limit is not None and member.size > limit:
                sample.problem = RowError(
                    "ImageTooLarge", f"{shard}: {member.name} is {member.size} bytes, more than"
                                     f" image.max_file_bytes={limit}")
                return
            sample.image = (_read(tar, member), ext)
        elif ext in ("json", "txt"):
            if member.size > MAX_TEXT_BYTES:
                sample.problem = RowError(
                    "SampleTooLarge", f"{shard}: {member.name} is {member.size} bytes, more than"
                                      f" {MAX_TEXT_BYTES}")
                return
            if ext == "json":
                sample.metadata = _read(tar, member)
            else:
                sample.text = _read(tar, member)

    def _row(self, sample: _Sample, shard: str) -> dict[str, Any] | RowError:
        """The row of a complete sample, or why it has none."""
        if sample.problem is not None:
            return sample.problem
        if sample.image is None:
            exts = ", ".join(f".{ext}" for ext in self.image_exts)
            return RowError("NoImage", f"{shard}: sample {sample.key} has no image ({exts})")
        row: dict[str, Any] = {}
        if sample.metadata is not None:
            try:
                row = json.loads(sample.metadata)
            except ValueError as exc:
                return RowError("BadMetadata",
                                f"{shard}: {sample.key}.json is not valid JSON: {exc}")
            if not isinstance(row, dict):
                return RowError("BadMetadata",
                                f"{shard}: {sample.key}.json is not a JSON object")
        row["key"] = sample.key
        row["shard"] = shard
        if sample.text is not None:
            row["txt"] = sample.text.decode("utf-8", errors="replace")
        data, ext = sample.image
        row[self.image_key] = to_data_uri(data, ext)
        return row


def _ends_cleanly(tar: tarfile.TarFile, shard: Path) -> bool:
    """Whether an uncompressed shard has the zero block that ends a tar where its members end.

    ``tarfile`` takes a header cut short or garbled for the end of the archive, so a shard cut
    at a member's boundary would otherwise lose its last samples without a word. (Compressed
    shards are not checked: their decoder reports a stream cut short.)
    """
    if getattr(tar.fileobj, "comptype", None) != "tar":
        return True
    try:
        with open(shard, "rb") as f:
            f.seek(tar.offset)
            block = f.read(tarfile.BLOCKSIZE)
    except OSError:
        return True  # reported as the read's own error, if it matters
    return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def _broken(shard: str, pending: _Sample | None, reason: str) -> RowError:
    """The error for a shard that cannot be read on: the samples from ``pending`` on are
    lost."""
    where = f"at sample {pending.key}" if pending else "before its first sample"
    return RowError("ShardUnreadable", f"{shard}: the shard breaks off {where}: {reason}")


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of the member the stream is at."""
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file, checked by the caller
    return stream.read()


def _reason(exc: BaseException) -> str:
    """An exception as one short line."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
