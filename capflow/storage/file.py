"""FileStorage: JSON (an array of rows, the seed's format) and JSON Lines files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from capflow.errors import ConfigError
from capflow.rows import Row
from capflow.storage.base import Storage
from capflow.storage.json_stream import count_json_lines, iter_json_array, iter_json_lines

FORMATS = ("json", "jsonl")


def _format_of(path: str, default: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in FORMATS else default


class FileStorage(Storage):
    """Rows in a JSON or JSON Lines file; each step writes ``<cache_path>/<prefix>_step<N>``.

    :param first_entry_file_name: the dataset: a ``.json`` array of rows or a ``.jsonl`` file.
    :param cache_path: the folder for step files (created when needed).
    :param file_name_prefix: the step files' name prefix.
    :param cache_type: the step files' format, ``json`` or ``jsonl``.
    """

    def __init__(
        self,
        first_entry_file_name: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        cache_type: str = "jsonl",
    ) -> None:
        if cache_type not in FORMATS:
            raise ConfigError(f"storage.cache_type must be one of {FORMATS}, not {cache_type!r}")
        if not first_entry_file_name:
            raise ConfigError("storage.first_entry_file_name (input=...) is not set")
        self.first_entry_file_name = str(first_entry_file_name)
        self.cache_path = str(cache_path)
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self._step = 0
        self._output: str | None = None
        # Paths in rows are relative to the dataset file, whichever step reads them.
        self._base_dir = Path(self.first_entry_file_name).resolve().parent

    def _step_file(self, step: int) -> str:
        if step == 0:
            return self.first_entry_file_name
        name = f"{self.file_name_prefix}_step{step}.{self.cache_type}"
        return os.path.join(self.cache_path, name)

    def step(self, output: str | None = None) -> FileStorage:
        view = FileStorage.__new__(FileStorage)
        view.__dict__.update(self.__dict__)
        self._step += 1
        view._step = self._step
        if output and Path(str(output)).suffix.lower() not in (".json", ".jsonl"):
            raise ConfigError(f"output must end in .json or .jsonl: {output}")
        view._output = str(output) if output else None
        return view

    @property
    def input_path(self) -> str:
        """The file this step reads."""
        return self._step_file(max(self._step - 1, 0))

    @property
    def output_path(self) -> str:
        """The file this step writes."""
        return self._output or self._step_file(max(self._step, 1))

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def input_name(self) -> str:
        return self.input_path

    @property
    def output_name(self) -> str:
        return self.output_path

    def input_identity(self) -> str:
        path = Path(self.input_path)
        try:
            st = path.stat()
        except OSError:
            return str(path.resolve())
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"

    def journal_path(self) -> Path:
        out = Path(self.output_path)
        return out.with_name(out.name + ".journal.sqlite")

    def _open_input(self):  # noqa: ANN202 - a text file object
        path = self.input_path
        try:
            return open(path, encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"input file not found: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read input file {path}: {exc.strerror}") from None

    def count(self, cheap_only: bool = False) -> int | None:
        path = self.input_path
        if _format_of(path, "jsonl") == "jsonl":
            return count_json_lines(path) if os.path.exists(path) else None
        if cheap_only:
            return None
        with self._open_input() as f:
            return sum(1 for _ in iter_json_array(f, path))

    def read(self) -> Iterator[Row]:
        path = self.input_path
        with self._open_input() as f:
            if _format_of(path, "jsonl") == "json":
                for index, (value, raw) in enumerate(iter_json_array(f, path)):
                    yield _row(index, value, raw, f"{path}: row {index + 1}")
            else:
                for index, (number, raw) in enumerate(iter_json_lines(f)):
                    try:
                        value = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        value = _BadRow(f"{path}:{number}: not valid JSON ({exc.msg})")
                    yield _row(index, value, raw, f"{path}:{number}")

    def write(self, lines: Iterable[str]) -> None:
        path = Path(self.output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        as_array = _format_of(str(path), self.cache_type) == "json"
        with open(tmp, "w", encoding="utf-8") as f:
            if as_array:
                f.write("[")
                for n, line in enumerate(lines):
                    f.write(",\n  " if n else "\n  ")
                    f.write(line)
                f.write("\n]\n")
            else:
                for line in lines:
                    f.write(line)
                    f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class _BadRow(str):
    """Marks a row whose text could not be parsed; the string is the error message."""


def _row(index: int, value: object, raw: str, where: str) -> Row:
    if isinstance(value, dict):
        return Row(index, value, raw)
    message = str(value) if isinstance(value, _BadRow) else f"{where}: a row must be a JSON object"
    # Keep the unparseable text so the output still accounts for this row.
    return Row(index, {"_raw": raw}, None, error=message)
