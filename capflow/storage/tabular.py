"""CSV and TSV files as input, read with the stdlib ``csv`` module.

The header row names the columns; each later record becomes a row of its cells (strings). The
operator reads a row's images from its ``image`` key, so the image column (``image_column``, or
the first of ``IMAGE_COLUMNS`` the header has) is also given as ``"image": [<cell>]`` unless it
is the ``image`` column itself. A record with more or fewer cells than the header is that row's
error, naming its line; a file whose header has no image column is refused before anything is
sent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

from capflow.errors import ConfigError
from capflow.redaction import printable
from capflow.rows import Row
from capflow.storage.json_stream import utf8_problem

IMAGE_COLUMNS = ("image", "image_path", "file", "filename", "path", "url")
# csv's default cap on a cell is 128 KiB, less than a data: URI of an ordinary photo; a cell may
# be as long as image.max_file_bytes' 64 MB once base64-encoded. (The cap is global to the
# process, so it is only ever raised.)
_FIELD_LIMIT = 96 << 20
_SHOWN_COLUMNS = 20

Record = tuple[int, list[str], list[str]]  # (first line, cells, the lines it was read from)


class Table:
    """The rows of one CSV or TSV file.

    :param path: the file.
    :param delimiter: ``","`` for CSV, ``"\\t"`` for TSV.
    :param image_column: the column holding image references (None: the first of
        ``IMAGE_COLUMNS`` that the header has, matched without regard to case).
    """

    def __init__(self, path: str, delimiter: str, image_column: str | None = None) -> None:
        self.path, self.delimiter, self.image_column = path, delimiter, image_column

    def scan(self) -> int:
        """Read the whole file once and return its number of rows, having checked that it is
        UTF-8, that its header names an image column, and that no quote runs to its end.

        :raises ConfigError: one line naming the problem and its place.
        """
        records = self._records()
        self._header(records)
        count = 0
        last: Record | None = None
        for record in records:
            count += 1
            last = record
        if last is not None and _quote_left_open("".join(last[2]), self.delimiter):
            raise ConfigError(f"{self.path}:{last[0]}: a quoted cell that starts on this line is"
                              " never closed (a missing '\"')")
        return count

    def rows(self) -> Iterator[Row]:
        """The file's rows, streamed in order.

        :raises ConfigError: the file cannot be read, or its header names no image column.
        """
        records = self._records()
        header, image_column = self._header(records)
        for index, (line, cells, lines) in enumerate(records):
            yield self._row(index, line, cells, lines, header, image_column)

    def _header(self, records: Iterator[Record]) -> tuple[list[str], str]:
        """The header (the first record) and the image column it names."""
        first = next(records, None)
        if first is None:
            raise ConfigError(f"{self.path} is empty: a {self._kind} file starts with a header"
                              " row naming its columns")
        line, header, _ = first
        return header, self._image_column(header, line)

    def _records(self) -> Iterator[Record]:
        """Every record that is not a blank line, the header first."""
        if csv.field_size_limit() < _FIELD_LIMIT:
            csv.field_size_limit(_FIELD_LIMIT)
        line = 1
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                taken: list[str] = []

                def lines() -> Iterator[str]:
                    for text in f:
                        taken.append(text)  # kept for the output of a record that is wrong
                        yield text

                reader = csv.reader(lines(), delimiter=self.delimiter)
                for cells in reader:
                    if cells:
                        yield line, cells, taken
                    taken = []  # a new list: the one yielded is the consumer's
                    line = reader.line_num + 1
        except UnicodeDecodeError:
            raise ConfigError(utf8_problem(self.path)) from None
        except csv.Error as exc:
            raise ConfigError(f"{self.path}:{line}: {_csv_problem(exc)}") from None

    @property
    def _kind(self) -> str:
        return "TSV" if self.delimiter == "\t" else "CSV"

    def _image_column(self, header: list[str], line: int) -> str:
        seen = set()
        for name in header:
            if name in seen:
                raise ConfigError(f"{self.path}:{line}: the header names the column {name!r}"
                                  " twice; give each column its own name")
            seen.add(name)
        wanted = self.image_column
        if wanted is not None:
            if wanted not in seen:
                raise ConfigError(f"{self.path} has no column {wanted!r}"
                                  f" (storage.image_column); its columns: {_columns(header)}")
            if wanted != "image" and "image" in seen:
                raise ConfigError(f"{self.path} has an 'image' column as well as"
                                  f" storage.image_column={wanted}: rename one of them")
            return wanted
        folded = {name.strip().lower(): name for name in reversed(header)}
        for candidate in IMAGE_COLUMNS:
            if candidate in folded:
                return folded[candidate]
        raise ConfigError(f"{self.path} has no image column (its columns: {_columns(header)});"
                          " set storage.image_column to the column with the image paths or"
                          f" URLs{self._looks_like(header)}")

    def _looks_like(self, header: list[str]) -> str:
        """A hint when the header says the file is in another format than its name."""
        first = header[0].lstrip()
        if first.startswith(("{", "[")):
            return "; the file looks like JSON: name it .json (an array) or .jsonl"
        if len(header) == 1 and self.delimiter == "," and "\t" in first:
            return "; the file looks tab-separated: name it .tsv"
        if len(header) == 1 and self.delimiter == "\t" and "," in first:
            return "; the file looks comma-separated: name it .csv"
        return ""

    def _row(self, index: int, line: int, cells: list[str], lines: list[str],
             header: list[str], image_column: str) -> Row:
        if len(cells) != len(header):
            raw = "".join(lines).rstrip("\r\n")
            return Row(index, {"_raw": raw}, None, error=(
                f"{self.path}:{line}: {len(cells)} cells where the header has {len(header)}"
                " columns"))
        values: dict[str, Any] = dict(zip(header, cells, strict=True))
        ref = values[image_column]
        data = values
        if image_column != "image":
            values["image"] = [ref] if ref.strip() else []
        elif not ref.strip():
            # An empty cell is a row without an image (NoImage), not a bad reference; the
            # output keeps the cell as it was.
            data = {**values, "image": []}
        return Row(index, data, json.dumps(values, ensure_ascii=False))


def _columns(header: list[str]) -> str:
    shown = [printable(name, 40) or '""' for name in header[:_SHOWN_COLUMNS]]
    more = len(header) - _SHOWN_COLUMNS
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _csv_problem(exc: csv.Error) -> str:
    if "field larger than field limit" in str(exc):
        return (f"a cell longer than {_FIELD_LIMIT} characters: is a quote ('\"') opened and"
                " never closed?")
    return str(exc)


def _quote_left_open(text: str, delimiter: str) -> bool:
    """Whether the record ``text`` ends inside a quoted cell. The csv module (not strict) takes
    such a cell to the end of the file; its strict mode says so."""
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False
