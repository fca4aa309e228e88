"""Finished rows written as CSV or TSV: one header row, then one record per row.

The columns are every key of the rows, in the order they first appear (a CSV input's columns
come first, as each of its rows holds them in order, then ``caption``), with the error keys
``_raw`` and ``_error`` last. Strings are written as they are, other values as compact JSON,
a key a row lacks as an empty cell. Learning the columns takes a pass over the rows before the
one that writes them: rows that can be read only once are kept meanwhile in a nameless
temporary file beside the output, never in memory.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from capflow.storage.atomic import replace_atomically

_LAST = ("_raw", "_error")  # the keys of failed rows, after the columns of good ones


def write_table(path: Path, lines: Iterable[str], delimiter: str = ",") -> None:
    """Replace ``path`` atomically with ``lines`` (JSON objects, one per string) as CSV, or as
    TSV with ``delimiter="\\t"``.

    :raises OSError: the file (or the temporary copy of the rows) cannot be written.
    """
    if not isinstance(lines, Iterator):  # a list, or a view that can be read again
        _write(path, _columns(lines), lines, delimiter)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Nameless (unlinked at once, or O_TMPFILE): nothing is left behind however we end.
    # newline="\n": a "\r" inside a row's JSON text is escaped, but never split a line on it.
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n", dir=path.parent) as spool:
        columns = _columns(_copied(lines, spool))
        spool.seek(0)
        _write(path, columns, (line.rstrip("\n") for line in spool), delimiter)


def _copied(lines: Iterable[str], spool: TextIO) -> Iterator[str]:
    for line in lines:
        spool.write(line)
        spool.write("\n")
        yield line


def _columns(lines: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}  # an ordered set
    for line in lines:
        for key in json.loads(line):
            seen.setdefault(key)
    return [k for k in seen if k not in _LAST] + [k for k in _LAST if k in seen]


def _write(path: Path, columns: list[str], lines: Iterable[str], delimiter: str) -> None:
    def body(f: TextIO) -> None:
        writer = csv.writer(f, dialect="excel-tab" if delimiter == "\t" else "excel")
        writer.writerow(columns)
        for line in lines:
            row = json.loads(line)
            writer.writerow([_cell(row[c]) if c in row else "" for c in columns])

    replace_atomically(path, body, newline="")  # the csv module ends its own lines


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
