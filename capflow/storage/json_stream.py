"""Streaming readers for JSON arrays and JSON Lines that keep each row's exact text."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import IO, BinaryIO

from capflow.errors import ConfigError
from capflow.storage.formats import looks_like

_CHUNK = 1 << 20
_SCAN_CHUNK = 1 << 20  # bytes per read of the UTF-8 scan: big enough that calls cost nothing
# Bytes decoded at once: the text of 16 KiB takes at most 64 KiB, below the size from which
# malloc maps fresh pages (and faults them in) for every block.
_DECODE_SLICE = 16 << 10
_decoder = json.JSONDecoder()
_scan_once = _decoder.scan_once  # type: ignore[attr-defined]  # set in __init__, not in stubs
_WS = re.compile(r"[ \t\r\n]*")  # JSON's whitespace, skipped at C speed
_SNIFF_LIMIT = 1 << 20  # characters of a JSON Lines file's first row parsed by check()


def iter_json_array(f: IO[str], name: str) -> Iterator[tuple[object, str]]:
    """Yield (value, exact text) for each element of a top-level JSON array, reading in chunks
    so that memory does not grow with the file.

    :raises ConfigError: the text is not one JSON array; the message names the line and
        column (``name:line:column: ...``) and what is wrong there.
    """
    text = _ArrayText(f, name)
    if not text.skip_ws() or text.buf[text.pos] != "[":
        raise ConfigError(text.not_an_array())
    text.pos += 1
    row = 0
    while True:
        if not text.skip_ws():
            raise ConfigError(text.not_closed())
        if text.buf[text.pos] == "]":
            text.pos += 1
            if text.skip_ws():
                raise ConfigError(f"{text.where()}: text after the end of the JSON array:"
                                  f" {text.near(text.pos)!r}")
            return
        if row:
            if text.buf[text.pos] != ",":
                raise ConfigError(f"{text.where()}: expected ',' or ']' after row {row}, found"
                                  f" {text.near(text.pos)!r}")
            text.pos += 1
            if not text.skip_ws():
                raise ConfigError(text.not_closed())
            if text.buf[text.pos] == "]":
                raise ConfigError(f"{text.where()}: a comma before the closing ']' (JSON allows"
                                  " no comma after the last row)")
        row += 1
        value, end = text.decode(row)
        yield value, text.buf[text.pos : end]
        text.pos = end
        if text.pos > _CHUNK:
            text.drop()


class _ArrayText:
    """The text of a JSON array, read a chunk at a time, that can say where any place in it
    is (line and column, counted only over the text it lets go of, and on an error)."""

    def __init__(self, f: IO[str], name: str) -> None:
        self.f, self.name = f, name
        self.buf, self.pos = f.read(_CHUNK), 0
        self.line, self.col = 1, 1  # where buf[0] is in the file

    def refill(self) -> bool:
        """Read the next chunk, letting go of the text before ``pos``; False at the end (the
        text is then as it was, so that positions found in it still hold)."""
        more = self.f.read(_CHUNK)
        if not more:
            return False
        self.drop()
        self.buf += more
        return True

    def drop(self) -> None:
        """Let go of the text before ``pos``, counting the lines it held."""
        pos, buf = self.pos, self.buf
        lines = buf.count("\n", 0, pos)
        if lines:
            self.line += lines
            self.col = pos - buf.rfind("\n", 0, pos)
        else:
            self.col += pos
        self.buf, self.pos = buf[pos:], 0

    def skip_ws(self) -> bool:
        """Move ``pos`` past whitespace; False when the text ends first."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()  # type: ignore[union-attr]  # * matches
            if self.pos < len(self.buf):
                return True
            if not self.refill():
                return False

    def decode(self, row: int) -> tuple[object, int]:
        """The value starting at ``pos`` and where it ends, reading on while it may be cut."""
        while True:
            try:
                try:
                    # The C scanner itself: raw_decode adds only a Python frame around it.
                    value, end = _scan_once(self.buf, self.pos)
                except StopIteration as stop:
                    raise json.JSONDecodeError("Expecting value", self.buf, stop.value) from None
            except json.JSONDecodeError as exc:
                # Read on only when the value may run past the chunk: an error anywhere else
                # is the file's, and reading the rest of it would only take memory.
                if _may_be_cut(exc, len(self.buf)) and self.refill():
                    continue
                near = self.buf[max(self.pos, exc.pos - 20) : exc.pos + 20]
                reason = _reason(exc.msg, self.buf[exc.pos : exc.pos + 1])
                raise ConfigError(f"{self.where(exc.pos)}: row {row} is not valid JSON"
                                  f" ({reason}) near {near!r}") from None
            # A number cut by the chunk boundary decodes "successfully" to a prefix.
            if end == len(self.buf) and not isinstance(value, (dict, list, str)) and self.refill():
                continue
            return value, end

    def where(self, pos: int | None = None) -> str:
        """``name:line:column`` of ``pos`` (default: the current place) in the buffer."""
        pos = self.pos if pos is None else pos
        lines = self.buf.count("\n", 0, pos)
        col = pos - self.buf.rfind("\n", 0, pos) if lines else self.col + pos
        return f"{self.name}:{self.line + lines}:{col}"

    def near(self, pos: int) -> str:
        return self.buf[pos : pos + 30]

    def not_closed(self) -> str:
        return f"{self.where()}: the JSON array is not closed (no ']' at the end)"

    def not_an_array(self) -> str:
        if self.pos >= len(self.buf):
            return f"{self.name}: the file is empty; a .json input is a JSON array of rows"
        # The whole first line, to tell what the file is.
        while "\n" not in self.buf[self.pos :] and len(self.buf) - self.pos < _SNIFF_LIMIT:
            if not self.refill():
                break
        end = self.buf.find("\n", self.pos)
        first = self.buf[self.pos : end if end >= 0 else len(self.buf)]
        if first.startswith("{"):
            try:
                one_line = isinstance(json.loads(first), dict)
            except ValueError:
                one_line = False
            looks = ("JSON Lines (one object per line): name it .jsonl" if one_line else
                     "one JSON object, not an array: put the rows in [ ]")
        else:
            looks = looks_like(first)
        return (f"{self.where()}: expected a JSON array of rows (starting with '['); the file"
                f" looks like {looks}")


def _may_be_cut(exc: json.JSONDecodeError, length: int) -> bool:
    """Whether the decoder may have failed only because the text stops at ``length``: it
    reports a string that does not end where the string starts, anything else where it stops
    making sense (a few characters back at most: "tru", "1e+", "\\u12")."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= length - 8


def _reason(msg: str, char: str) -> str:
    """What the decoder says is wrong (``char`` is where it says so), in plain words."""
    if msg.startswith("Unterminated string") or (
            msg.startswith("Invalid control character") and char in "\r\n"):
        return "a string is not closed"  # strings cannot span lines
    if msg.startswith("Invalid control character"):
        return f"a control character ({char!r}) inside a string"
    return msg


def scan_json_array(path: str) -> int:
    """The number of rows of the ``.json`` file ``path``, having checked in one streamed pass
    that it is UTF-8 and one JSON array (about 0.3 s for 100,000 rows, 36 MB).

    :raises ConfigError: one line naming the first problem and where it is.
    """
    with open(path, encoding="utf-8-sig") as f:
        try:
            return sum(1 for _ in iter_json_array(f, path))
        except UnicodeDecodeError:
            raise ConfigError(utf8_problem(path)) from None


def check_first_json_line(path: str) -> None:
    """One bad line in JSON Lines is that row's error, but a first row that is not JSON at all
    means the file is not JSON Lines (a CSV file renamed, say): raise ``ConfigError`` saying
    what it looks like."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        number = 0
        while True:
            line = f.readline(_SNIFF_LIMIT)
            if not line:
                return  # no rows at all
            number += 1
            if line.strip():
                break
    text = line.strip()
    if len(line) >= _SNIFF_LIMIT and not line.endswith("\n"):
        # Too long to parse here: only an array is sure not to be a row.
        if text.startswith("["):
            raise ConfigError(f"{path}:{number}: not JSON Lines; the file looks like"
                              f" {looks_like(text)}")
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ConfigError(f"{path}:{number}: the first row is not JSON ({reason}); the file"
                          f" looks like {looks_like(text)}") from None
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{path}:{number}: the first row is a JSON array, not a row; the file"
                          f" looks like {looks_like(text)}")


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


def check_utf8(f: BinaryIO, name: str) -> None:
    """Raise ``ConfigError`` naming the line and byte offset of the first byte of ``f`` (a
    seekable binary file, read from its start) that is not UTF-8, or ``name``'s encoding when
    it is plainly UTF-16.

    One streamed pass through an incremental decoder (a character cut by a chunk boundary is
    completed by the next chunk), so memory stays flat. Chunks of pure ASCII, most of a typical
    dataset, are passed over by ``bytes.isascii``; others are decoded in slices small enough
    that the decoded text is recycled from the heap instead of each slice costing fresh pages
    (five times faster than decoding whole chunks). Lines are counted only once a bad byte is
    found (``f`` is read again up to it): counting them all the way would double the cost.
    30 MB takes 15 to 25 ms.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    chunk = f.read(_SCAN_CHUNK)
    if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # What Windows PowerShell's `>` and some editors save: every row would be wrong.
        raise ConfigError(f"{name}: the file is UTF-16 text, not UTF-8; save it as UTF-8")
    done = 0  # bytes before ``chunk``
    while chunk:
        # A chunk of ASCII is valid, unless it follows a character the last chunk cut short.
        if not chunk.isascii() or decoder.getstate()[0]:
            view = memoryview(chunk)
            for start in range(0, len(chunk), _DECODE_SLICE):
                # Bytes of a character cut by the last slice: the decoder puts them first.
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(view[start : start + _DECODE_SLICE])
                except UnicodeDecodeError as exc:
                    offset = done + start + exc.start - pending
                    raise ConfigError(
                        _not_utf8(f, name, exc.object[exc.start], offset)
                    ) from None
        done += len(chunk)
        chunk = f.read(_SCAN_CHUNK)
    cut = decoder.getstate()[0]
    if cut:  # the file ends inside a character
        raise ConfigError(_not_utf8(f, name, cut[0], done - len(cut)))


def _not_utf8(f: BinaryIO, name: str, byte: int, offset: int) -> str:
    f.seek(0)
    line = 1
    left = offset
    while left > 0:
        data = f.read(min(left, _SCAN_CHUNK))
        if not data:
            break
        line += data.count(b"\n")
        left -= len(data)
    return (f"{name}:{line}: not valid UTF-8 (byte 0x{byte:02x} at offset {offset});"
            " save the file as UTF-8")


def utf8_problem(path: str) -> str:
    """The one-line message for ``path`` not being UTF-8, with the place when it is found."""
    try:
        with open(path, "rb") as f:
            check_utf8(f, path)
    except ConfigError as exc:
        return str(exc)
    except OSError:
        pass
    return f"{path}: not valid UTF-8; save the file as UTF-8"
