"""RowFilter: a pipeline step that keeps or drops rows by a rule on a field, sending nothing.

Rules on one field (``key``, a dotted path such as ``caption`` or ``verdict.accurate``):
length bounds (characters of a text, items of a list), a regular expression the text must
contain, a value the field must equal. A row passes when every rule set holds. Dropped rows
go to a file of their own, each with a ``_dropped`` record saying which rule dropped it, and
are counted in the summary. Rows that failed an earlier step pass through untouched.

The step is cheap and deterministic, so it keeps no journal: a rerun filters again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from capflow import templates
from capflow.errors import ConfigError, RowError
from capflow.operators.base import Operator
from capflow.request import Request, Response
from capflow.rows import Row
from capflow.run import RunSummary
from capflow.summary import format_summary

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.serving.base import Serving
    from capflow.storage.base import Storage

log = logging.getLogger(__name__)
ERROR_KEY = "_error"
DROPPED_KEY = "_dropped"


class RowFilter(Operator):
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
        self.dropped_output = dropped_output
        self.serving = serving  # type: ignore[assignment]
        if all(r is None for r in (self.min_length, self.max_length, self.pattern, equals)):
            raise ConfigError(f"RowFilter on {self.key!r} has no rule: set min_length,"
                              " max_length, pattern or equals")

    def describe(self) -> dict[str, Any]:
        return {"operator": type(self).__name__, "key": self.key, "min_length": self.min_length,
                "max_length": self.max_length,
                "pattern": self.pattern.pattern if self.pattern else None,
                "equals": self.equals, "keep_missing": self.keep_missing}

    def prepare(self, row: Row, base_dir: Path) -> Request:
        raise TypeError("RowFilter sends no requests: run it with run()")

    def apply(self, row: Row, response: Response) -> dict[str, Any]:
        raise TypeError("RowFilter sends no requests: run it with run()")

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

    def run(self, storage: Storage, *, dry_run: bool = False,
            settings: EngineSettings | None = None, **keys: Any) -> RunSummary:
        """Filter every row of ``storage``: the kept go to its output, the dropped to
        ``dropped_output``, both streamed. Returns the summary (``done`` kept, ``dropped``,
        ``failed``: rows that failed an earlier step)."""
        from capflow.engine import record

        for name, value in keys.items():
            if not hasattr(self, name):
                raise TypeError(f"{type(self).__name__}.run() got an unknown setting {name!r}")
            setattr(self, name, value)
        began = time.perf_counter()
        started = datetime.datetime.now().astimezone()
        storage.check()
        dropped_path = Path(self.dropped_output or f"{storage.output_name}.dropped.jsonl")
        summary = RunSummary(dry_run=dry_run, output=storage.output_name)
        summary.dropped_output = str(dropped_path)
        self._failed_types: Counter[str] = Counter()
        if dry_run:
            deque(self._kept(storage, summary, None), maxlen=0)  # counted, not written
        else:
            self._write(storage, summary, dropped_path)
        summary.total = summary.rows
        summary.output_ok, summary.output_failed = summary.done, summary.failed
        summary.elapsed = time.perf_counter() - began
        if not dry_run:
            self._write_manifest(storage, summary, settings, started)
        text = format_summary(summary)
        if settings is None or settings.report:
            print(text, flush=True)
        record.info("%s", text)
        return summary

    def _kept(self, storage: Storage, summary: RunSummary, dropped: IO[str] | None
              ) -> Iterator[str]:
        """The kept rows' lines, as they are read; the dropped ones go to ``dropped``."""
        for row in storage.read():
            summary.rows += 1
            error = row.data.get(ERROR_KEY)
            if row.error or isinstance(error, dict):
                # Failed before this step (or unreadable): kept, still failed, untouched.
                error = error if isinstance(error, dict) else \
                    RowError("BadRow", row.error or "").record()
                summary.failed += 1
                self._failed_types[str(error.get("type"))] += 1
                if len(summary.failures) < 20:
                    summary.failures.append((row.index, error))
                yield row.with_fields({ERROR_KEY: error})
                continue
            reason = self.why_dropped(row.data)
            if reason is None:
                summary.done += 1
                yield row.with_fields({})
                continue
            summary.dropped += 1
            if dropped is not None:
                dropped.write(row.with_fields({DROPPED_KEY: {"rule": self.key,
                                                             "reason": reason}}) + "\n")

    def _write(self, storage: Storage, summary: RunSummary, dropped_path: Path) -> None:
        """Both files in one pass over the rows, each replaced atomically."""
        try:
            dropped_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dropped_path.name[:200]}.", suffix=".tmp",
                                       dir=dropped_path.parent)
        except OSError as exc:
            raise ConfigError(f"cannot write the dropped rows to {dropped_path}:"
                              f" {exc.strerror or exc}") from None
        try:
            with open(fd, "w", encoding="utf-8") as dropped:
                storage.write(self._kept(storage, summary, dropped))
                dropped.flush()
                os.fsync(dropped.fileno())
            os.replace(tmp, dropped_path)
        except OSError as exc:
            raise ConfigError(f"cannot write the dropped rows to {dropped_path}:"
                              f" {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _write_manifest(self, storage: Storage, summary: RunSummary,
                        settings: EngineSettings | None, started: datetime.datetime) -> None:
        """``<output>.run.json``, as every step leaves one (a sweep's comparison reads it)."""
        from capflow import manifest
        from capflow.engine import outputs_written

        record = manifest.build(
            summary, settings.run_context if settings else None, input_name=storage.input_name,
            started=started, ended=datetime.datetime.now().astimezone(), this_run_failures={},
            output_failures=dict(self._failed_types.most_common()))
        record["dropped"] = {"rows": summary.dropped, "file": summary.dropped_output}
        path = Path(f"{storage.output_name}{manifest.SUFFIX}")
        outputs_written.append(storage.output_name)
        try:
            path.write_text(manifest.dumps(record), encoding="utf-8")
        except OSError as exc:
            log.warning("could not write the run's manifest %s: %s", path, exc.strerror or exc)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
