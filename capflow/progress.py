"""The progress bar: rows per second, ETA and failures while a step runs."""

from __future__ import annotations

import sys


class Progress:
    """A tqdm bar on a terminal; silent elsewhere (logs and pipes get the final summary)."""

    @staticmethod
    def shown(enabled: bool) -> bool:
        """Whether a bar would be drawn."""
        return enabled and sys.stderr.isatty()

    def __init__(self, total: int | None, *, enabled: bool = True) -> None:
        self.failed = 0
        self._bar = None
        if self.shown(enabled):
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", dynamic_ncols=True, mininterval=0.25)

    def update(self, *, failed: bool = False, skipped: bool = False) -> None:
        """Count one finished row."""
        if self._bar is None:
            return
        if failed:
            self.failed += 1
            self._bar.set_postfix(failed=self.failed, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Take the bar off the screen."""
        if self._bar is not None:
            self._bar.close()
