"""capflow-webdataset: a capflow plugin adding ``storage=webdataset``.

It captions WebDataset tar shards as img2dataset writes them (``000000.tar``, ``000001.tar``,
..., each sample a ``KEY.jpg`` with its ``KEY.json`` and ``KEY.txt``) and writes captioned
shards, or JSON Lines. This module is the plugin (the entry point in ``pyproject.toml`` names
it): its two hooks register the storage class and the config option
``conf/storage/webdataset.yaml``.
"""

from __future__ import annotations

from capflow import hookimpl
from capflow.plugins import ComponentRegister, ConfigRegistry
from capflow_webdataset.storage import WebDatasetStorage

__all__ = ["WebDatasetStorage"]


@hookimpl
def capflow_register_storages(register: ComponentRegister) -> None:
    """Register the class: ``capflow plugins`` lists it, and runs may build it."""
    register("webdataset", WebDatasetStorage)


@hookimpl
def capflow_register_config(config: ConfigRegistry) -> None:
    """Put ``conf/`` on the config search path: ``conf/storage/webdataset.yaml`` is the option
    ``storage=webdataset``."""
    config.add_search_path("pkg://capflow_webdataset.conf")
