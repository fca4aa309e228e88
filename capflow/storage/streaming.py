"""StreamingStorage: the base class for a storage of a format of its own (Parquet, tar shards,
a database table).

A subclass says how to read its dataset's rows and how to write the final output's rows; this
class does the rest of the ``Storage`` contract. The steps between the first and the last
keep their rows in JSON Lines step files under ``cache_path`` (as ``FileStorage`` does), so a
multi-step pipeline reads the dataset once and writes the chosen format once. Every step gets
the engine's journal, resume and atomic output for free::

    class LinesStorage(StreamingStorage):
        \"\"\"One image path per line in; JSON Lines out.\"\"\"

        def read_rows(self):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield {"image": line.strip()}

        def write_rows(self, rows, path):
            with open(path, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\\n")
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from capflow.errors import CapflowError, ConfigError, RowError
from capflow.rows import Row
from capflow.storage.atomic import replace_path_atomically, write_atomically
from capflow.storage.base import Storage
from capflow.storage.file import _digest, _json_rows, _reading, check_output_path
from capflow.storage.json_stream import count_json_lines

__all__ = ["StreamingStorage"]


class StreamingStorage(Storage):
    """Rows read from ``path`` by ``read_rows()``; the last step's rows written to the
    ``output`` by ``write_rows()``; in between, JSON Lines step files under ``cache_path``.

    :param path: the dataset: a file, or a folder (of shards, say), as the subclass reads it.
    :param cache_path: the folder for step files and, beside them, the response cache.
    :param file_name_prefix: the step files' name prefix.
    :param image_key: the row key holding each row's image (or list of images); the pipelines
        read images from there (None: ``image``).

    Subclasses implement ``read_rows()`` and ``write_rows()``; they may override
    ``check_input()`` (a one-line error before anything is sent), ``count_rows()`` (for the
    progress bar), ``input_files()`` (what the resume identity covers) and ``writes()`` (the
    outputs written in the storage's own format rather than as JSON Lines).
    """

    def __init__(
        self,
        path: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        image_key: str | None = None,
    ) -> None:
        if not path:
            raise ConfigError(f"{type(self).__name__} needs a path: the dataset (input=...)")
        self.path = str(path)
        self.cache_path = str(cache_path)
        self.file_name_prefix = str(file_name_prefix)
        self.image_key = str(image_key) if image_key else None
        self._step = 0
        self._output: str | None = None

    # -- what a subclass implements ---------------------------------------------------------

    @abstractmethod
    def read_rows(self) -> Iterator[dict[str, Any]]:
        """The dataset's rows, streamed in order, each a dict of JSON values (str, numbers,
        bools, None, lists, dicts). Yield an exception (``capflow.errors.RowError``, say) in
        place of a row that cannot be read: that row fails alone, with its message."""

    @abstractmethod
    def write_rows(self, rows: Iterable[dict[str, Any]], path: Path) -> None:
        """Write the last step's rows, streamed in input order, to ``path`` (a temporary file
        that then replaces the output atomically). ``rows`` can be iterated more than once."""

    def check_input(self) -> None:
        """Raise ``ConfigError`` (one line) when the dataset cannot be read; the default
        checks that ``path`` exists."""
        if not os.path.exists(self.path):
            raise ConfigError(f"input not found: {self.path}")

    def count_rows(self) -> int | None:
        """How many rows ``read_rows()`` yields, when that is cheap to know (None: unknown)."""
        return None

    def input_files(self) -> list[Path]:
        """The files the dataset is made of; a change to any of them (its size or time) starts
        the first step's journal afresh. Default: ``path``, or the files in it if a folder."""
        root = Path(self.path)
        if root.is_dir():
            return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
        return [root]

    def writes(self, path: str) -> bool:
        """Whether ``write_rows()`` writes an output at ``path``; other outputs (``.jsonl``,
        say) are written as JSON Lines. Default: every output."""
        return True

    # -- the Storage contract ---------------------------------------------------------------

    def _step_file(self, step: int) -> str:
        return os.path.join(self.cache_path, f"{self.file_name_prefix}_step{step}.jsonl")

    def step(self, output: str | None = None) -> StreamingStorage:
        view = type(self).__new__(type(self))
        view.__dict__.update(self.__dict__)
        self._step += 1
        view._step = self._step
        if output and os.path.isdir(output):
            raise ConfigError(f"output is a folder: {output}; name a file")
        view._output = str(output) if output else None
        return view

    @property
    def output(self) -> str | None:
        """The output this step was given (``output=...``), or None for a step file."""
        return self._output

    @property
    def output_path(self) -> str:
        """The file this step writes."""
        return self._output or self._step_file(max(self._step, 1))

    @property
    def reads_earlier_step(self) -> bool:
        return self._step > 1

    @property
    def base_dir(self) -> Path:
        root = Path(self.path).resolve()
        return root if root.is_dir() else root.parent

    @property
    def input_name(self) -> str:
        return self.path if self._step <= 1 else self._step_file(self._step - 1)

    @property
    def output_name(self) -> str:
        return self.output_path

    def input_identity(self) -> str:
        if self._step > 1:
            path = Path(self.input_name)
            return f"{path.resolve()}:{_digest(path)}"
        digest = hashlib.sha256(type(self).__qualname__.encode())
        for file in self.input_files():
            try:
                st = file.stat()
                digest.update(f"{file.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{file}:missing\n".encode())
        return f"{self.path}:{digest.hexdigest()}"

    def journal_path(self) -> Path:
        out = Path(self.output_path)
        return out.with_name(out.name + ".journal.sqlite")

    def check(self) -> None:
        if self._step <= 1:
            self.check_input()
        elif not os.path.exists(self.input_name):
            raise ConfigError(f"the previous step's rows are missing: {self.input_name}")
        check_output_path(self.output_path)

    def count(self, cheap_only: bool = False) -> int | None:
        if self._step <= 1:
            return self.count_rows()
        path = self.input_name
        return count_json_lines(path) if os.path.exists(path) else None

    def read(self) -> Iterator[Row]:
        if self._step > 1:
            path = self.input_name
            with _reading(path), open(path, encoding="utf-8") as f:
                yield from _json_rows(f, path, "jsonl")
            return
        where = self.path
        for index, data in enumerate(self.read_rows()):
            if isinstance(data, dict):
                yield Row(index, data)
            elif isinstance(data, Exception):
                kind = data.kind if isinstance(data, RowError) else type(data).__name__
                yield Row(index, {}, error=f"{where}: row {index + 1}: {data}", error_type=kind)
            else:
                yield Row(index, {}, error=f"{where}: row {index + 1}: not a mapping of fields")

    def write(self, rows: Iterable[Any]) -> None:
        path = Path(self.output_path)
        try:
            if self._output is not None and self.writes(self._output):
                replace_path_atomically(path, lambda tmp: self.write_rows(rows, tmp))
            else:
                write_atomically(path, (json.dumps(r, ensure_ascii=False) for r in rows))
        except OSError as exc:
            raise CapflowError(
                f"cannot write {path}: {exc.strerror or exc}; the finished rows are kept in the"
                f" journal {self.journal_path()}: fix that and run the same command again"
            ) from None
