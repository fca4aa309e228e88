"""Calling the observer hooks (``capflow_run_start``, ``capflow_row_finished``,
``capflow_run_end``) through pluggy's own calling, so that ``tryfirst``, ``trylast`` and
wrappers mean what pluggy says, while a failing observer can never stop a run.

Each plain implementation is guarded where it sits: an exception is reported once and the
implementation is not called again this run, while the others are called as pluggy would. A
wrapper that fails is reported the same way (the call it wrapped is then over).
``CAPFLOW_TRACE_PLUGINS=1`` prints every hook call and its result on stderr (pluggy's tracing).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
TRACE_ENV = "CAPFLOW_TRACE_PLUGINS"


class ObserverHooks:
    """The observer hooks of one run; a failing observer is reported once and never stops it."""

    # (plugin, hook) pairs that failed in the current run: each run starts with none.
    failed: set[tuple[str, str]] = set()

    def __init__(self, pm: Any) -> None:
        self._pm = pm
        ObserverHooks.failed = set()
        if os.environ.get(TRACE_ENV, "") not in ("", "0") and not getattr(pm, "_capflow_traced",
                                                                          False):
            pm.trace.root.setwriter(lambda text: sys.stderr.write(f"[capflow trace] {text}"))
            pm.enable_tracing()
            pm._capflow_traced = True

    def __getattr__(self, name: str) -> Any:
        caller = getattr(self._pm.hook, name)
        for impl in caller.get_hookimpls():
            if not (impl.hookwrapper or impl.wrapper) and not hasattr(impl.function,
                                                                     "capflow_guarded"):
                impl.function = _guard(impl.function, impl.plugin_name, name)

        def call(**kwargs: Any) -> None:
            try:
                caller(**kwargs)
            except Exception as exc:  # a wrapper's own failure: the call it wrapped is over
                _report("a wrapper", name, exc)

        setattr(self, name, call)  # looked up once per run, not once per row
        return call


def _guard(function: Callable[..., Any], plugin: str, hook: str) -> Callable[..., Any]:
    """``function``, reporting its first failure of a run and skipped for the rest of it."""

    def guarded(*args: Any) -> Any:
        if (plugin, hook) in ObserverHooks.failed:
            return None
        try:
            return function(*args)
        except Exception as exc:
            ObserverHooks.failed.add((plugin, hook))
            _report(repr(plugin), hook, exc)
            return None

    guarded.capflow_guarded = True  # type: ignore[attr-defined]
    return guarded


def _report(who: str, hook: str, exc: Exception) -> None:
    log.warning("plugin %s failed in %s (%s: %s); it is not called again this run", who, hook,
                type(exc).__name__, exc)
