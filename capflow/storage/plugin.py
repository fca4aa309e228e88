"""Registers the built-in storages, exactly as a third-party plugin would."""

from capflow.hookspecs import hookimpl
from capflow.storage.file import FileStorage


@hookimpl
def capflow_register_storages(register):  # noqa: ANN001 - see capflow.hookspecs
    register("file", FileStorage)
