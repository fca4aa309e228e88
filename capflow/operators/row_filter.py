"""RowFilter: a pipeline step that keeps or drops rows by a rule on a field, sending nothing.

Rules on one field (``key``, a dotted path such as ``caption`` or ``verdict.accurate``):
length bounds (characters of a text, items of a list), a regular expression the text must
contain, a value the field must equal. A row passes when every rule set holds. Dropped rows
go to a file of their own, each with a ``_dropped`` record saying which rule dropped it, and
are counted in the summary. Rows that failed an earlier step pass through untouched.

The step is cheap and deterministic, so it keeps no journal: a rerun filters again.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from capflow import templates
from capflow.errors import ConfigError
from capflow.operators.map_step import DROPPED_KEY, ERROR_KEY, MapStep

if TYPE_CHECKING:
    from capflow.serving.base import Serving

__all__ = ["DROPPED_KEY", "ERROR_KEY", "RowFilter"]


class RowFilter(MapStep):
    """Keeps the rows whose field ``key`` passes every rule set; drops the others.

    :param key: the field the rules look at (dotted for nested values: ``verdict.accurate``).
    :param min_length: fewest characters (a text) or items (a list) kept.
    :param max_length: most characters or items kept.
    :param pattern: a regular expression the text must contain (``re.search``).
    :param equals: the value the field must have (``true``, ``"yes"``, ``3``).
    :param keep_missing: keep rows that lack the field (default: drop them).
    :param dropped_output: where dropped rows go (.jsonl); None: beside the step's output,
        as ``<output>.dropped.jsonl``.
    :param serving: not used (a filter sends nothing); accepted like every step's.
    """

    def __init__(
        self,
        key: str,
        min_length: int | None = None,
        max_length: int | None = None,
        pattern: str | None = None,
        equals: Any = None,
        keep_missing: bool = False,
        dropped_output: str | None = None,
        serving: Serving | None = None,
    ) -> None:
        if not key:
            raise ConfigError("RowFilter needs key: the field its rules look at")
        self.key = str(key)
        self.min_length = None if min_length is None else int(min_length)
        self.max_length = None if max_length is None else int(max_length)
        try:
            self.pattern = re.compile(pattern) if pattern else None
        except re.error as exc:
            raise ConfigError(f"RowFilter pattern {pattern!r} is not a regular expression:"
                              f" {exc}") from None
        self.equals = equals
        self.keep_missing = bool(keep_missing)
        super().__init__(dropped_output=dropped_output)
        self.serving = serving  # type: ignore[assignment]
        if all(r is None for r in (self.min_length, self.max_length, self.pattern, equals)):
            raise ConfigError(f"RowFilter on {self.key!r} has no rule: set min_length,"
                              " max_length, pattern or equals")

    def describe(self) -> dict[str, Any]:
        return {"operator": type(self).__name__, "key": self.key, "min_length": self.min_length,
                "max_length": self.max_length,
                "pattern": self.pattern.pattern if self.pattern else None,
                "equals": self.equals, "keep_missing": self.keep_missing}

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        return {}  # the rules are cheap: admit() applies them, in input order

    def admit(self, row: dict[str, Any]) -> str | None:
        return self.why_dropped(row)

    def dropped_record(self, reason: str) -> dict[str, Any]:
        return {"rule": self.key, "reason": reason}

    def why_dropped(self, data: dict[str, Any]) -> str | None:
        """The rule ``data`` breaks, in words; None when the row is kept."""
        if not templates.has(data, self.key):
            return None if self.keep_missing else f"no {self.key!r}"
        value = templates.lookup(data, self.key)
        if self.equals is not None and value != self.equals:
            return f"{self.key} is {_short(value)}, not {_short(self.equals)}"
        if self.min_length is not None or self.max_length is not None:
            sized = isinstance(value, (str, list, dict))
            size = len(value) if sized else len(json.dumps(value))
            unit = "items" if isinstance(value, (list, dict)) else "characters"
            if self.min_length is not None and size < self.min_length:
                return f"{self.key} has {size} {unit}, fewer than {self.min_length}"
            if self.max_length is not None and size > self.max_length:
                return f"{self.key} has {size} {unit}, more than {self.max_length}"
        if self.pattern is not None:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if not self.pattern.search(text):
                return f"{self.key} does not match {self.pattern.pattern!r}"
        return None

def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
