"""Finding, loading and checking plugins.

Built-in storages, servings, operators and config options are plugins too: they register
through the same hooks, right after the third-party ones that entry points announce.
Set ``CAPFLOW_DISABLE_PLUGINS`` to a comma-separated list of plugin names (``all`` for every
third-party plugin) to switch plugins off.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import pluggy

from capflow import hookspecs
from capflow.errors import PluginError

ENTRY_POINT_GROUP = "capflow"
DISABLE_ENV = "CAPFLOW_DISABLE_PLUGINS"
KINDS = ("storage", "serving", "operator", "executor")

# Built-ins register like third-party plugins; this list is all that makes them built-in.
DEFAULT_PLUGINS = (
    "capflow.storage.plugin",
    "capflow.serving.plugin",
    "capflow.operators.plugin",
    "capflow.executors.plugin",
)
BUILTIN_CONFIG = "pkg://capflow.conf"


class _PluginManager(pluggy.PluginManager):
    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts: Any = super().parse_hookimpl_opts(plugin, name)
        # An unmarked function named like a hook is still a hook implementation, so that a
        # misspelt name reaches check_pending() and fails loudly.
        if opts is None and name.startswith("capflow_") and callable(getattr(plugin, name, None)):
            opts = {}
        return opts


class ComponentRegister:
    """The ``register`` callable handed to ``capflow_register_<kind>s`` hooks."""

    def __init__(self, registry: PluginRegistry, kind: str, plugin: str) -> None:
        self._registry, self._kind, self._plugin = registry, kind, plugin

    def __call__(self, name: str, cls: type) -> None:
        self._registry._add_component(self._kind, name, cls, self._plugin)


class ConfigRegistry:
    """The object handed to ``capflow_register_config``: adds config-group options."""

    def __init__(self, registry: PluginRegistry, plugin: str) -> None:
        self._registry, self._plugin = registry, plugin

    def add_search_path(self, path: str) -> None:
        """Put a YAML config tree (``pkg://module`` or ``file://dir``) on the search path."""
        self._registry.search_paths.append(path)
        for group, name in _options_in_tree(path):
            self._registry._add_option(group, name, self._plugin)

    def add_node(self, group: str, name: str, node: Any) -> None:
        """Add one option ``group=name`` from a dataclass or dict."""
        self._registry.nodes.append((group, name, node))
        self._registry._add_option(group, name, self._plugin)


@dataclass
class PluginRegistry:
    """Everything the loaded plugins provide, and which plugin provides it."""

    components: dict[str, dict[str, tuple[type, str]]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    options: dict[tuple[str, str], str] = field(default_factory=dict)
    search_paths: list[str] = field(default_factory=list)
    nodes: list[tuple[str, str, Any]] = field(default_factory=list)
    # Plugins that could not be imported, by name: why (they are left out of the run).
    broken: dict[str, str] = field(default_factory=dict)

    def _add_component(self, kind: str, name: str, cls: type, plugin: str) -> None:
        known = self.components[kind]
        if name in known and known[name][1] != plugin:
            raise PluginError(
                f"two plugins register the {kind} {name!r}: {known[name][1]!r} and {plugin!r}"
            )
        known[name] = (cls, plugin)

    def _add_option(self, group: str, name: str, plugin: str) -> None:
        owner = self.options.get((group, name))
        if owner is not None and owner != plugin:
            raise PluginError(
                f"two plugins provide the config option {group}={name}: {owner!r} and {plugin!r}"
            )
        self.options[(group, name)] = plugin

    def get(self, kind: str, name: str) -> type:
        """The class registered as ``name`` for ``kind`` (storage, serving or operator)."""
        try:
            return self.components[kind][name][0]
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            raise PluginError(f"no {kind} named {name!r} (installed: {known})") from None

    def registers(self, cls: type) -> bool:
        """Whether an enabled plugin (capflow's own included) registered ``cls``."""
        return any(cls is known for kind in self.components.values() for known, _ in
                   kind.values())

    def broken_lines(self) -> list[str]:
        """One line per plugin that could not be loaded."""
        return [f"plugin {name!r} could not be loaded and is left out ({why})"
                for name, why in sorted(self.broken.items())]

    def provided_by(self, plugin: str) -> list[str]:
        """What one plugin provides, as ``kind name`` and ``group=option`` strings."""
        out = [
            f"{kind} {name}"
            for kind, known in self.components.items()
            for name, (_, owner) in known.items()
            if owner == plugin
        ]
        out += [f"{g}={n}" for (g, n), owner in sorted(self.options.items()) if owner == plugin]
        return out


def _options_in_tree(path: str) -> Iterable[tuple[str, str]]:
    """The (group, option) pairs a YAML tree provides; nested groups are joined by ``/``."""
    if path.startswith("pkg://"):
        root: Any = resources.files(path[len("pkg://") :].replace("/", "."))
    else:
        root = Path(path.removeprefix("file://"))

    def walk(node: Any, group: str) -> Iterable[tuple[str, str]]:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")):
                yield from walk(child, f"{group}/{child.name}" if group else child.name)
            elif group and child.name.endswith((".yaml", ".yml")):
                yield group, child.name.rsplit(".", 1)[0]

    yield from walk(root, "")


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def load_plugins() -> tuple[pluggy.PluginManager, PluginRegistry]:
    """Load entry-point and built-in plugins, check them, and collect what they provide."""
    pm = _PluginManager("capflow")
    pm.add_hookspecs(hookspecs)
    disabled = _disabled()
    for name in disabled:
        pm.set_blocked(name)
    broken: dict[str, str] = {}
    if "all" not in disabled:
        _check_entry_point_names()
        broken = _load_entry_points(pm)
    for module_name in DEFAULT_PLUGINS:
        if module_name not in disabled:
            _register(pm, __import__(module_name, fromlist=["_"]), module_name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{_invalid(pm, exc)} (misspelt hook name?)") from None

    registry = PluginRegistry(broken=broken)
    # The built-in YAML tree is Hydra's primary config; record its options under "capflow".
    for group, name in _options_in_tree(BUILTIN_CONFIG):
        registry._add_option(group, name, "capflow")
    # Called one implementation at a time, so that each registration is credited to its plugin.
    for kind in KINDS:
        for impl in getattr(pm.hook, f"capflow_register_{kind}s").get_hookimpls():
            _call(impl, ComponentRegister(registry, kind, impl.plugin_name))
    for impl in pm.hook.capflow_register_config.get_hookimpls():
        _call(impl, ConfigRegistry(registry, impl.plugin_name))
    return pm, registry


def _load_entry_points(pm: pluggy.PluginManager) -> dict[str, str]:
    """Load each entry-point plugin on its own: one that cannot even be imported is left out
    (and returned, by name, with why) while the others load; an invalid one is an error."""
    broken: dict[str, str] = {}
    names = sorted({ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)})
    for name in names:
        if pm.is_blocked(name) or pm.get_plugin(name) is not None:
            continue
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(_invalid(pm, exc)) from None
        except Exception as exc:  # its import failed: a missing dependency, a bug
            dist = _distribution_of(name)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            broken[name] = f"{dist}: {reason[:300]}" if dist else reason[:300]
    return broken


def _distribution_of(entry_point: str) -> str | None:
    for dist in metadata.distributions():
        if any(ep.group == ENTRY_POINT_GROUP and ep.name == entry_point
               for ep in dist.entry_points):
            return f"{dist.metadata['Name']} {dist.version}"
    return None


def _call(impl: Any, registry: object) -> None:
    if impl.hookwrapper or impl.wrapper:
        raise PluginError(f"plugin {impl.plugin_name!r}: registration hooks cannot be wrappers")
    impl.function(**{name: registry for name in impl.argnames})


def _invalid(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", repr(exc.plugin))
    reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "invalid"
    return f"plugin {name!r} is invalid: {reason}"


def _check_entry_point_names() -> None:
    """Two distributions announcing one plugin name is an error, not a silent first-wins."""
    seen: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            owner = (dist.metadata["Name"], ep.value)
            known = seen.setdefault(ep.name, owner)
            # The same distribution can be visible twice (e.g. through a venv's system site).
            if known[1] != ep.value or known[0] != owner[0]:
                raise PluginError(
                    f"two plugins are named {ep.name!r}: distributions {known[0]!r}"
                    f" ({known[1]}) and {owner[0]!r} ({ep.value})"
                )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(_invalid(pm, exc)) from None


_loaded: tuple[pluggy.PluginManager, PluginRegistry] | None = None


def get_plugins() -> tuple[pluggy.PluginManager, PluginRegistry]:
    """The process's plugin manager and registry, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """The process's plugin manager (for calling observer hooks)."""
    return get_plugins()[0]
