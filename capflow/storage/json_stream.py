"""Streaming readers for JSON arrays and JSON Lines that keep each row's exact text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO

from capflow.errors import ConfigError

_CHUNK = 1 << 20
_decoder = json.JSONDecoder()


def iter_json_array(f: IO[str], name: str) -> Iterator[tuple[object, str]]:
    """Yield (value, exact text) for each element of a top-level JSON array, reading in chunks
    so that memory does not grow with the file."""
    buf, pos = f.read(_CHUNK), 0

    def refill() -> bool:
        nonlocal buf, pos
        more = f.read(_CHUNK)
        buf, pos = buf[pos:] + more, 0
        return bool(more)

    pos = _skip_ws(buf, pos)
    if pos >= len(buf) or buf[pos] != "[":
        raise ConfigError(f"{name}: expected a JSON array of rows (starting with '[')")
    pos += 1
    row = 0
    while True:
        pos = _skip_ws(buf, pos)
        while pos >= len(buf):
            if not refill():
                raise ConfigError(f"{name}: the JSON array is not closed (missing ']')")
            pos = _skip_ws(buf, pos)
        if buf[pos] == "]":
            return
        if row:
            if buf[pos] != ",":
                raise ConfigError(f"{name}: expected ',' or ']' after row {row}")
            pos = _skip_ws(buf, pos + 1)
        while True:
            pos = _skip_ws(buf, pos)
            try:
                value, end = _decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                if refill():
                    continue
                snippet = buf[pos : pos + 60]
                raise ConfigError(
                    f"{name}: row {row + 1} is not valid JSON ({exc.msg}): {snippet!r}"
                ) from None
            # A number cut by the chunk boundary decodes "successfully" to a prefix.
            if end == len(buf) and not isinstance(value, (dict, list, str)) and refill():
                continue
            break
        row += 1
        yield value, buf[pos:end]
        pos = end
        if pos > _CHUNK:
            buf, pos = buf[pos:], 0


def _skip_ws(buf: str, pos: int) -> int:
    n = len(buf)
    while pos < n and buf[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_json_lines(f: IO[str]) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) for each non-blank line."""
    for number, line in enumerate(f, 1):
        text = line.strip()
        if text:
            yield number, text


def count_json_lines(path: str) -> int:
    """Non-blank lines in a JSON Lines file, counted without parsing."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                count += 1
    return count
