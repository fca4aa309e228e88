"""Prompt templates: ``{title}`` or ``{meta.source}`` in a prompt is the row's field.

Only a brace around a field path (names joined by dots; a number picks a list item) is a field,
so prompts that show JSON examples or other braces need no escaping; ``{{`` and ``}}`` write a
brace where one would otherwise be read as a field. A row without the field fails with a
``MissingField`` error that names it, and nothing is sent for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from capflow.errors import RowError

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][\w-]*(?:\.[\w-]+)*)\}")
_MISSING = object()


def fields(template: str) -> list[str]:
    """The field paths ``template`` uses, in order."""
    return [m[1] for m in _FIELD.finditer(template) if m[1]]


def lookup(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` in ``data``; ``_MISSING`` when there is none."""
    value = data
    for name in path.split("."):
        if isinstance(value, dict) and name in value:
            value = value[name]
        elif isinstance(value, list) and name.isdigit() and int(name) < len(value):
            value = value[int(name)]
        else:
            return _MISSING
    return value


def has(data: Any, path: str) -> bool:
    """Whether ``data`` has a value (even null) at ``path``."""
    return lookup(data, path) is not _MISSING


def render(template: str, data: dict[str, Any], where: str = "the prompt") -> str:
    """``template`` with each ``{field}`` replaced by the row's value: text as it is, anything
    else as compact JSON. Raises ``RowError`` (``MissingField``) for a field the row lacks."""

    def value(m: re.Match[str]) -> str:
        if not m[1]:
            return m[0][0]  # {{ or }}
        found = lookup(data, m[1])
        if found is _MISSING or found is None:
            state = "has no" if found is _MISSING else "has a null"
            raise RowError("MissingField",
                           f"row {state} {m[1]!r}, which {where} uses as {{{m[1]}}}")
        if isinstance(found, str):
            return found
        return json.dumps(found, ensure_ascii=False, separators=(", ", ": "))

    return _FIELD.sub(value, template)
