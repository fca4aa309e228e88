"""Parquet values to JSON values and back, guided by the column's Arrow type.

capflow keeps each finished row in its journal as JSON, so a row read from Parquet must hold
JSON values only: bytes become ``data:`` URIs (an image's carries its MIME type, so capflow can
send it as it is), dates and times ISO 8601 text, decimals text, durations seconds, maps lists
of pairs. Writing, the input's type of each column turns them back, so the output's columns
have exactly the input's types.
"""

from __future__ import annotations

import base64
import datetime
import decimal
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.types as pt

Convert = Callable[[Any], Any]

_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)


def mime_of(data: bytes) -> str:
    """The image MIME type ``data`` starts like, else ``application/octet-stream``."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _is_binary(t: pa.DataType) -> bool:
    return pt.is_binary(t) or pt.is_large_binary(t) or pt.is_fixed_size_binary(t) or (
        hasattr(pt, "is_binary_view") and pt.is_binary_view(t))


def _is_list(t: pa.DataType) -> bool:
    return pt.is_list(t) or pt.is_large_list(t) or pt.is_fixed_size_list(t) or (
        hasattr(pt, "is_list_view") and (pt.is_list_view(t) or pt.is_large_list_view(t)))


def needs_conversion(t: pa.DataType) -> bool:
    """Whether values of type ``t`` are not JSON values as pyarrow gives them."""
    if pt.is_dictionary(t):
        return needs_conversion(t.value_type)
    if _is_binary(t) or pt.is_temporal(t) or pt.is_decimal(t) or pt.is_map(t):
        return True
    if pt.is_struct(t):
        return any(needs_conversion(t.field(i).type) for i in range(t.num_fields))
    if _is_list(t):
        return needs_conversion(t.value_type)
    return False


def to_json(t: pa.DataType) -> Convert:
    """A function turning a Python value of Arrow type ``t`` into a JSON value."""
    if pt.is_dictionary(t):
        return to_json(t.value_type)
    if _is_binary(t):
        return _nullable(lambda b: f"data:{mime_of(b)};base64,{base64.b64encode(b).decode()}")
    if pt.is_duration(t):
        return _nullable(lambda d: d.total_seconds() if isinstance(d, datetime.timedelta) else d)
    if pt.is_temporal(t):
        return _nullable(lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v))
    if pt.is_decimal(t):
        return _nullable(str)
    if pt.is_map(t):
        key, item = to_json(t.key_type), to_json(t.item_type)
        return _nullable(lambda pairs: [[key(k), item(v)] for k, v in pairs])
    if pt.is_struct(t):
        fields = [(t.field(i).name, to_json(t.field(i).type)) for i in range(t.num_fields)]
        return _nullable(lambda d: {name: f(d.get(name)) for name, f in fields})
    if _is_list(t):
        each = to_json(t.value_type)
        return _nullable(lambda items: [each(v) for v in items])
    return _same


def from_json(t: pa.DataType) -> Convert:
    """The inverse of ``to_json(t)``: a JSON value back to what pyarrow takes for type ``t``."""
    if pt.is_dictionary(t):
        return from_json(t.value_type)
    if _is_binary(t):
        return _nullable(_bytes)
    if pt.is_duration(t):
        return _nullable(lambda s: datetime.timedelta(seconds=s) if isinstance(s, (int, float))
                         else s)
    if pt.is_timestamp(t):
        return _nullable(_datetime)
    if pt.is_date(t):
        return _nullable(lambda s: datetime.date.fromisoformat(s) if isinstance(s, str) else s)
    if pt.is_time(t):
        return _nullable(lambda s: datetime.time.fromisoformat(s) if isinstance(s, str) else s)
    if pt.is_decimal(t):
        return _nullable(lambda s: decimal.Decimal(str(s)))
    if pt.is_map(t):
        key, item = from_json(t.key_type), from_json(t.item_type)
        return _nullable(lambda pairs: [(key(k), item(v)) for k, v in pairs])
    if pt.is_struct(t):
        fields = [(t.field(i).name, from_json(t.field(i).type)) for i in range(t.num_fields)]
        return _nullable(lambda d: {name: f(d.get(name)) for name, f in fields})
    if _is_list(t):
        each = from_json(t.value_type)
        return _nullable(lambda items: [each(v) for v in items])
    return _same


def _same(value: Any) -> Any:
    return value


def _nullable(convert: Convert) -> Convert:
    return lambda value: None if value is None else convert(value)


def _bytes(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("data:"):
            value = value.partition(",")[2]
        return base64.b64decode(value)
    return value


def _datetime(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    # Python before 3.11 reads neither a trailing Z nor every fraction length.
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
