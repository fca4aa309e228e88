"""The progress bar: rows per second, ETA, failures and the sending's state while a step runs."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

_STATUS_EVERY = 0.5  # seconds between two refreshes of the status fields


class Progress:
    """A tqdm bar on a terminal; silent elsewhere (logs and pipes get the final summary).

    :param total: rows expected, when known.
    :param status: fields shown beside the bar (e.g. the adaptive in-flight limit), read at
        most every half second.
    """

    @staticmethod
    def shown(enabled: bool) -> bool:
        """Whether a bar would be drawn."""
        return enabled and sys.stderr.isatty()

    def __init__(self, total: int | None, *, enabled: bool = True,
                 status: Callable[[], dict[str, object]] | None = None) -> None:
        self.failed = 0
        self._bar = None
        self._status = status
        self._status_at = 0.0
        if self.shown(enabled):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", dynamic_ncols=True, mininterval=0.25)

    def update(self, *, failed: bool = False, skipped: bool = False) -> None:
        """Count one finished row."""
        if self._bar is None:
            return
        if failed:
            self.failed += 1
        now = time.monotonic()
        if failed or now - self._status_at > _STATUS_EVERY:
            self._status_at = now
            fields = {"failed": self.failed} if self.failed else {}
            if self._status is not None:
                fields.update(self._status())
            self._bar.set_postfix(fields, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Take the bar off the screen."""
        if self._bar is not None:
            self._bar.close()
