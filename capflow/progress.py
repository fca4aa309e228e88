"""Progress while a step runs: a bar on a terminal, a line every few seconds elsewhere.

On a terminal, a tqdm bar shows rows, rate and ETA, with failures, tokens, cost and the sending's
state beside it. When stderr is not a terminal (nohup, CI, a log file), one line goes to stderr
every ``interval`` seconds instead, so that a log shows a run's life, not only its end.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TextIO

_STATUS_EVERY = 0.5  # seconds between two refreshes of the bar's status fields


class Progress:
    """Counts finished rows and shows them.

    :param total: rows expected, when known.
    :param enabled: show anything at all (``progress=false`` shows nothing).
    :param interval: seconds between two progress lines when stderr is not a terminal.
    :param status: fields shown beside the counts (tokens, cost, the in-flight limit), read when
        they are shown.
    """

    @staticmethod
    def shown(enabled: bool) -> bool:
        """Whether a bar would be drawn (a terminal)."""
        return enabled and sys.stderr.isatty()

    def __init__(self, total: int | None, *, enabled: bool = True, interval: float = 10.0,
                 status: Callable[[], dict[str, object]] | None = None,
                 stream: TextIO | None = None) -> None:
        self.total = total
        self.done = self.failed = self.skipped = 0
        self.enabled = enabled
        self.interval = float(interval)
        self._status = status
        self._status_at = 0.0
        self._stream = stream or sys.stderr
        self._began = time.monotonic()
        self._bar = None
        if self.shown(enabled) and stream is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", dynamic_ncols=True, mininterval=0.25)

    def update(self, *, failed: bool = False, skipped: bool = False) -> None:
        """Count one finished (or skipped) row."""
        if skipped:
            self.skipped += 1
        elif failed:
            self.failed += 1
        else:
            self.done += 1
        if self._bar is None:
            return
        now = time.monotonic()
        if failed or now - self._status_at > _STATUS_EVERY:
            self._status_at = now
            self._bar.set_postfix(self.fields(), refresh=False)
        self._bar.update(1)

    def fields(self) -> dict[str, object]:
        """What is shown beside the counts."""
        fields: dict[str, object] = {"failed": self.failed} if self.failed else {}
        if self._status is not None:
            fields.update(self._status())
        return fields

    def line(self) -> str:
        """One line saying how far the step has come (for logs)."""
        finished = self.done + self.failed + self.skipped
        elapsed = max(time.monotonic() - self._began, 1e-9)
        rate = (self.done + self.failed) / elapsed
        parts = [f"{finished}/{self.total} rows" if self.total is not None
                 else f"{finished} rows"]
        if self.total:
            parts[0] += f" ({100 * finished / self.total:.0f}%)"
        parts.append(f"{rate:.1f} rows/s")
        if self.total and rate > 0 and finished < self.total:
            parts.append(f"ETA {_duration((self.total - finished) / rate)}")
        if self.skipped:
            parts.append(f"{self.skipped} skipped")
        parts += [f"{key.replace('_', ' ')} {value}" for key, value in self.fields().items()]
        return f"[capflow] {_duration(elapsed)}: " + ", ".join(parts)

    async def tick(self) -> None:
        """Print a progress line every ``interval`` seconds while there is no bar (run as a
        task; cancelled when the step ends)."""
        if self._bar is not None or not self.enabled or self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.interval)
            print(self.line(), file=self._stream, flush=True)

    def close(self) -> None:
        """Take the bar off the screen."""
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
