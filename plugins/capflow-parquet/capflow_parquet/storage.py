"""ParquetStorage: rows from Parquet, finished rows to Parquet, both streamed.

Reading goes a record batch at a time (``batch_rows``), so memory does not grow with the
dataset. Writing reads the finished rows twice: once to learn the new columns' types (a caption
is text, a structured answer a struct, an ``_error`` record a struct that only failed rows
have), once to write them a row group at a time. The input's columns keep the input's types.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capflow import CapflowError, ConfigError, StreamingStorage
from capflow_parquet.values import from_json, needs_conversion, to_json

SUFFIXES = (".parquet", ".pq", ".parq")
COMPRESSIONS = ("snappy", "zstd", "gzip", "brotli", "lz4", "none")


class ParquetStorage(StreamingStorage):
    """A Parquet file (or a folder of them) in; Parquet out when the output ends in
    ``.parquet`` (any other output is JSON Lines).

    :param path: the dataset: a ``.parquet`` file or a folder of ``.parquet`` files (read in
        name order, as one table: they must share a schema).
    :param cache_path: the folder for step files and the response cache.
    :param file_name_prefix: the step files' name prefix.
    :param image_key: the column of images: paths, URLs, ``data:`` URIs, or structs
        ``{bytes, path}`` as Hugging Face ``datasets`` writes them.
    :param batch_rows: rows read at a time.
    :param row_group_rows: rows per row group written.
    :param compression: the output's compression codec.
    """

    def __init__(
        self,
        path: str,
        cache_path: str = "./cache_local",
        file_name_prefix: str = "capflow",
        image_key: str | None = "image",
        batch_rows: int = 1024,
        row_group_rows: int = 4096,
        compression: str = "zstd",
    ) -> None:
        super().__init__(path, cache_path, file_name_prefix, image_key)
        if int(batch_rows) < 1 or int(row_group_rows) < 1:
            raise ConfigError("storage.batch_rows and storage.row_group_rows must be at least 1")
        if str(compression).lower() not in COMPRESSIONS:
            raise ConfigError(f"storage.compression must be one of {', '.join(COMPRESSIONS)},"
                              f" not {compression!r}")
        self.batch_rows = int(batch_rows)
        self.row_group_rows = int(row_group_rows)
        self.compression = str(compression).lower()

    # -- reading ----------------------------------------------------------------------------

    def input_files(self) -> list[Path]:
        root = Path(self.path)
        if root.is_dir():
            return sorted(p for p in root.iterdir()
                          if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        return [root]

    def _open(self, file: Path) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"cannot read {file} as Parquet: {reason}") from None

    def schema(self) -> pa.Schema:
        """The input's Arrow schema (the first file's)."""
        return self._open(self.input_files()[0]).schema_arrow

    def check_input(self) -> None:
        super().check_input()
        files = self.input_files()
        if not files:
            raise ConfigError(f"no .parquet files in the folder {self.path}")
        first = self._open(files[0]).schema_arrow
        for file in files[1:]:
            if not self._open(file).schema_arrow.equals(first):
                raise ConfigError(f"{file} has another schema than {files[0]}: the files of"
                                  " one dataset must share their columns and types")
        if self.image_key and self.image_key not in first.names:
            raise ConfigError(
                f"{self.path} has no column {self.image_key!r} (storage.image_key); its"
                f" columns: {', '.join(first.names)}; set storage.image_key to the column of"
                " images")

    def count_rows(self) -> int | None:
        try:
            return sum(self._open(f).metadata.num_rows for f in self.input_files())
        except ConfigError:
            return None

    def read_rows(self) -> Iterator[dict[str, Any]]:
        for file in self.input_files():
            parquet = self._open(file)
            schema = parquet.schema_arrow
            converters = {f.name: to_json(f.type) for f in schema if needs_conversion(f.type)}
            for batch in parquet.iter_batches(batch_size=self.batch_rows):
                columns = {}
                for name in batch.schema.names:
                    values = batch.column(name).to_pylist()
                    convert = converters.get(name)
                    columns[name] = [convert(v) for v in values] if convert else values
                names = list(columns)
                for values in zip(*columns.values(), strict=True):
                    yield dict(zip(names, values, strict=True))

    # -- writing ----------------------------------------------------------------------------

    def writes(self, path: str) -> bool:
        return Path(path).suffix.lower() in SUFFIXES

    def write_rows(self, rows: Iterable[dict[str, Any]], path: Path) -> None:
        base = self.schema()
        schema = output_schema(base, rows)
        converters = {f.name: from_json(f.type) for f in base if needs_conversion(f.type)}
        codec = None if self.compression == "none" else self.compression
        with pq.ParquetWriter(path, schema, compression=codec) as writer:
            source = iter(rows)
            while chunk := list(islice(source, self.row_group_rows)):
                writer.write_table(_table(chunk, schema, converters),
                                   row_group_size=self.row_group_rows)


def output_schema(base: pa.Schema, rows: Iterable[dict[str, Any]], chunk_rows: int = 1024,
                  ) -> pa.Schema:
    """``base`` and, after it, each new column in the order rows bring it, with the type of its
    values (a column whose values share no type is written as JSON text)."""
    known = set(base.names)
    found: dict[str, pa.DataType] = {}
    as_text: set[str] = set()
    source = iter(rows)
    while chunk := list(islice(source, chunk_rows)):
        keys = dict.fromkeys(k for row in chunk for k in row if k not in known)
        new = {key: [row.get(key) for row in chunk] for key in keys}
        for key, values in new.items():
            if key in as_text:
                continue
            try:
                seen = pa.array(values).type
                found[key] = (pa.unify_schemas(
                    [pa.schema([(key, found[key])]), pa.schema([(key, seen)])],
                    promote_options="permissive").field(key).type if key in found else seen)
            except (pa.ArrowException, TypeError, ValueError):
                as_text.add(key)
                found[key] = pa.string()
    fields = list(base) + [pa.field(k, pa.string() if k in as_text else t)
                           for k, t in found.items()]
    metadata = _metadata(base, {k: t for k, t in found.items() if k not in as_text})
    schema = pa.schema(fields, metadata=metadata)
    return schema.with_metadata({**(metadata or {}), b"capflow:json_text": json.dumps(
        sorted(as_text)).encode()}) if as_text else schema


def _metadata(base: pa.Schema, new: dict[str, pa.DataType]) -> dict[bytes, bytes] | None:
    """The input's schema metadata, its Hugging Face ``datasets`` features told about new
    text columns (other new columns: the features go, ``datasets`` infers them)."""
    metadata = dict(base.metadata or {})
    hf = metadata.get(b"huggingface")
    if hf is None:
        return metadata or None
    try:
        info = json.loads(hf)
        features = info["info"]["features"]
        if not all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in new.values()):
            raise KeyError("not only text")
        for key in new:
            features[key] = {"dtype": "string", "_type": "Value"}
        metadata[b"huggingface"] = json.dumps(info).encode()
    except (KeyError, TypeError, ValueError):
        metadata.pop(b"huggingface")
    return metadata or None


def _table(chunk: list[dict[str, Any]], schema: pa.Schema,
           converters: dict[str, Any]) -> pa.Table:
    text = set(json.loads(schema.metadata.get(b"capflow:json_text", b"[]"))
               if schema.metadata else [])
    arrays = []
    for field in schema:
        values = [row.get(field.name) for row in chunk]
        if field.name in text:
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        elif field.name in converters:
            convert = converters[field.name]
            values = [convert(v) for v in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise CapflowError(
                f"column {field.name!r} no longer fits its type {field.type}: {exc}".splitlines()[0]
            ) from None
    return pa.Table.from_arrays(arrays, schema=schema)
