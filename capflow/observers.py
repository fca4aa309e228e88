"""Calling the observer hooks (``capflow_run_start``, ``capflow_row_finished``,
``capflow_run_end``) so that a failing observer can never stop a run."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ObserverHooks:
    """Calls observer hooks; a failing observer is reported once and never stops the run."""

    def __init__(self, pm: Any) -> None:
        self._pm = pm
        self._failed: set[tuple[str, str]] = set()

    def __getattr__(self, name: str) -> Any:
        impls = getattr(self._pm.hook, name).get_hookimpls()

        def call(**kwargs: Any) -> None:
            for impl in impls:
                if (impl.plugin_name, name) in self._failed:
                    continue
                try:
                    impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
                except Exception as exc:
                    self._failed.add((impl.plugin_name, name))
                    log.warning("plugin %r failed in %s (%s: %s); it is not called again"
                                " this run", impl.plugin_name, name, type(exc).__name__, exc)

        setattr(self, name, call)  # looked up once per run, not once per row
        return call
