"""Rows as they stream through capflow, and how they are written back unchanged.

A row keeps the exact text it was read from. Output keys are spliced into that text, so every
field a row came with is written back byte for byte: ``"id": "0012"`` stays a string, ``1e5``
stays ``1e5``, paths keep their slashes and unknown keys survive.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_LINE_BREAKS = re.compile(r"\s*\n\s*")


@dataclass(slots=True)
class Row:
    """One input row.

    :param index: its position in the input (0-based).
    :param data: the parsed row.
    :param raw: the exact JSON text of the row, or None when it was not read from text.
    :param error: why the row could not be read (it then fails without a request).
    :param error_type: the type of that error, in the row's ``_error`` record.
    """

    index: int
    data: dict[str, Any]
    raw: str | None = None
    error: str | None = None
    error_type: str = "BadRow"

    def with_fields(self, fields: dict[str, Any]) -> str:
        """The row as one line of JSON with ``fields`` added (or replaced)."""
        if self.raw is None or any(key in self.data for key in fields):
            merged = {**self.data, **fields}
            return json.dumps(merged, ensure_ascii=False)
        # A raw newline can only stand between tokens in JSON, never inside a string,
        # so folding line breaks keeps every value as it was.
        body = _fold_lines(self.raw.strip())[:-1].rstrip()
        added = ", ".join(
            f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
            for k, v in fields.items()
        )
        if not fields:
            return body + "}"
        separator = "" if body.endswith("{") else ", "
        return f"{body}{separator}{added}}}"


def _fold_lines(text: str) -> str:
    """Pretty-printed JSON on one line: indentation goes, values stay as they were."""
    if "\n" not in text:
        return text

    def fold(m: re.Match[str]) -> str:
        before = text[m.start() - 1] if m.start() else ""
        after = text[m.end()] if m.end() < len(text) else ""
        return "" if before in "[{" or after in "]}" else " "

    return _LINE_BREAKS.sub(fold, text)
