"""Registers the built-in executor, exactly as a third-party plugin would."""

from capflow.executors.local import LocalExecutor
from capflow.hookspecs import hookimpl


@hookimpl
def capflow_register_executors(register):  # noqa: ANN001 - see capflow.hookspecs
    register("local", LocalExecutor)
