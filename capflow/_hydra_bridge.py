"""Connects plugins to Hydra: their YAML trees go on the config search path, their typed nodes
into the ConfigStore, and capflow's resolvers are registered.

capflow does not rely on Hydra's ``hydra_plugins`` namespace discovery: that applies to every
Hydra app on the machine and does not see editable installs. This bridge is fed by the
``capflow_register_config`` hook instead.
"""

from __future__ import annotations

from importlib import resources
from typing import ClassVar

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from capflow.plugins import PluginRegistry


class CapflowSearchPathPlugin(SearchPathPlugin):
    """Appends the plugins' config trees to Hydra's search path."""

    paths: ClassVar[list[str]] = []

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for path in self.paths:
            search_path.append(provider="capflow-plugin", path=path)


def sample_dataset() -> str:
    """The path of the bundled sample dataset."""
    return str(resources.files("capflow.data") / "sample" / "sample_data.json")


def install(registry: PluginRegistry) -> None:
    """Make what the plugins provide visible to Hydra (idempotent)."""
    CapflowSearchPathPlugin.paths = list(registry.search_paths)
    Plugins.instance().register(CapflowSearchPathPlugin)
    store = ConfigStore.instance()
    for group, name, node in registry.nodes:
        store.store(group=group, name=name, node=node, provider="capflow-plugin")
    if not OmegaConf.has_resolver("capflow.sample"):
        OmegaConf.register_new_resolver("capflow.sample", sample_dataset)
