"""WebDatasetStorage: rows from WebDataset tar shards; captioned shards (or JSON Lines) out.

``capflow.StreamingStorage`` does the rest of a storage's work (the JSON Lines step files
between a pipeline's steps, the journal that lets a run resume, the atomic output); this class
says where the shards are, how they become rows and how the last step's rows are written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from capflow import CapflowError, ConfigError, RowError, StreamingStorage
from capflow_webdataset.jsonl_output import write_jsonl
from capflow_webdataset.outputs import OutputKind, check_output, journal_name, output_kind
from capflow_webdataset.reader import SampleReader
from capflow_webdataset.shards import check_tar, find_shards, shard_stem, stats_count
from capflow_webdataset.tar_output import write_tar, write_tar_shards


class WebDatasetStorage(StreamingStorage):
    """Samples of WebDataset tar shards as rows: each sample's ``.json`` fields, ``key``,
    ``shard`` (the tar's file name), ``txt`` (its ``.txt``, the original caption) and, under
    ``image_key``, its image as a ``data:`` URI.

    :param path: the shards: a folder of ``.tar`` files, one tar file, or a brace pattern
        (``shards/{000000..000009}.tar``).
    :param cache_path: the folder for the steps' rows and, beside them, the response cache.
    :param file_name_prefix: the step files' name prefix.
    :param image_key: the row key of each sample's image.
    :param caption_key: the field written as each sample's ``.txt`` in a tar output.
    :param samples_per_shard: with ``output='out/{shard}.tar'``, number the output shards and
        put this many samples in each (None: one output shard per input shard, same name).
    :param image_exts: the extensions of image members (the first image member of a sample is
        its image).
    :param max_image_bytes: a larger image member fails its row unread (None: no cap); the
        option follows ``image.max_file_bytes``.
    """

    def __init__(
        self,
        path: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        image_key: str | None = "image",
        caption_key: str = "caption",
        samples_per_shard: int | None = None,
        image_exts: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        max_image_bytes: int | None = None,
    ) -> None:
        super().__init__(path, cache_path, file_name_prefix, image_key or "image")
        self.caption_key = str(caption_key)
        if samples_per_shard is not None and int(samples_per_shard) < 1:
            raise ConfigError(
                f"storage.samples_per_shard must be >= 1 or null, not {samples_per_shard}")
        self.samples_per_shard = int(samples_per_shard) if samples_per_shard else None
        exts = tuple(str(ext).lower().lstrip(".") for ext in image_exts)
        if not exts or not all(exts):
            raise ConfigError(f"storage.image_exts must name image extensions, not {image_exts}")
        self.image_exts = exts
        if max_image_bytes is not None and int(max_image_bytes) < 0:
            raise ConfigError(
                f"storage.max_image_bytes must be >= 0 or null, not {max_image_bytes}")
        self.max_image_bytes = None if max_image_bytes is None else int(max_image_bytes)

    # -- reading ----------------------------------------------------------------------------

    def shards(self) -> list[Path]:
        """The input shards, in order (``ConfigError`` when there are none)."""
        return find_shards(self.path)

    def read_rows(self) -> Iterator[dict[str, Any] | RowError]:
        reader = SampleReader(self.image_key or "image", self.image_exts, self.max_image_bytes)
        yield from reader.rows(self.shards())

    def check_input(self) -> None:
        """The shards exist, and the first one is a tar file (a later shard that is not fails
        as one row when it is reached)."""
        check_tar(self.shards()[0])

    def count_rows(self) -> int | None:
        """The samples img2dataset says it wrote (its ``NNNNNN_stats.json`` beside each
        shard); None when a shard has no such file: counting members means reading them."""
        total = 0
        for shard in self.shards():
            count = stats_count(shard)
            if count is None:
                return None
            total += count
        return total

    def input_files(self) -> list[Path]:
        try:
            return self.shards()
        except ConfigError:  # reported by check_input(); the identity notes it as missing
            return [Path(self.path)]

    # -- writing ----------------------------------------------------------------------------

    def writes(self, path: str) -> bool:
        """``.tar`` and ``.jsonl`` outputs are written here; ``out/{shard}.tar`` by
        ``write()`` itself."""
        return output_kind(path) in (OutputKind.TAR, OutputKind.JSONL)

    def write_rows(self, rows: Iterable[dict[str, Any]], path: Path) -> None:
        """The last step's rows as one tar shard, or as JSON Lines for a ``.jsonl`` output."""
        image_key = self.image_key or "image"
        if output_kind(self._output or path.name) is OutputKind.JSONL:
            write_jsonl(rows, path, image_key)
        else:
            write_tar(enumerate(rows), path, image_key, self.caption_key)

    def write(self, rows: Iterable[Any]) -> None:
        """A sharded output (``out/{shard}.tar``) is written shard by shard, each replaced
        atomically; every other output as ``StreamingStorage`` writes it."""
        if self._output is None or output_kind(self._output) is not OutputKind.TAR_SHARDS:
            super().write(rows)
            return
        first = next((shard_stem(p.name) for p in self.input_files()), "000000")
        try:
            write_tar_shards(rows, self._output, self.samples_per_shard, first,
                             self.image_key or "image", self.caption_key)
        except OSError as exc:
            raise CapflowError(
                f"cannot write {self._output}: {exc.strerror or exc}; the finished rows are kept"
                f" in the journal {self.journal_path()}: fix that and run the same command again"
            ) from None

    def check(self) -> None:
        """``StreamingStorage``'s checks, then the output's: one this storage writes, and input
        shards of distinct names when output shards are named after them."""
        super().check()
        if self._output is not None:
            check_output(self._output, self.samples_per_shard, self.input_files())

    def journal_path(self) -> Path:
        """Beside the output, as ``StreamingStorage`` puts it; for ``out/{shard}.tar``,
        ``out/shards.tar.journal.sqlite``."""
        if self._output is not None and output_kind(self._output) is OutputKind.TAR_SHARDS:
            return journal_name(self._output)
        return super().journal_path()
