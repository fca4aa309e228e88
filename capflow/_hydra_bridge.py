"""Connects plugins to Hydra: their YAML trees go on the config search path, their typed nodes
into the ConfigStore, and capflow's resolvers are registered.

capflow does not rely on Hydra's ``hydra_plugins`` namespace discovery: that applies to every
Hydra app on the machine and does not see editable installs. This bridge is fed by the
``capflow_register_config`` hook instead.

It also adjusts what Hydra shows: its errors about the command line or the config become one
line each (``report_in_one_line``), and ``--cfg`` shows the config resolved
(``show_resolved_config``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from importlib import resources
from typing import Any, ClassVar

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


def beside(path: str | None, name: str) -> str | None:
    """``name`` in the folder of ``path``: ``${capflow.beside:${cache.path},images.sqlite}``
    (None when ``path`` is: no file, no neighbour)."""
    if path is None:
        return None
    return os.path.join(os.path.dirname(str(path)), name)


def image_key(_root_: Any) -> str:
    """Where the pipelines' steps find each row's image: the storage's ``image_key`` when it
    declares one (``${capflow.image_key:}``), else ``image``."""
    declared = OmegaConf.select(_root_, "storage.image_key", default=None)
    return str(declared) if declared else "image"


def install(registry: PluginRegistry) -> None:
    """Make what the plugins provide visible to Hydra (idempotent)."""
    CapflowSearchPathPlugin.paths = list(registry.search_paths)
    Plugins.instance().register(CapflowSearchPathPlugin)
    store = ConfigStore.instance()
    for group, name, node in registry.nodes:
        store.store(group=group, name=name, node=node, provider="capflow-plugin")
    if not OmegaConf.has_resolver("capflow.sample"):
        OmegaConf.register_new_resolver("capflow.sample", sample_dataset)
    if not OmegaConf.has_resolver("capflow.beside"):
        OmegaConf.register_new_resolver("capflow.beside", beside)
    if not OmegaConf.has_resolver("capflow.image_key"):
        OmegaConf.register_new_resolver("capflow.image_key", image_key)
    if not OmegaConf.has_resolver("capflow.job_dir"):
        from capflow.sweep import job_dir_name

        OmegaConf.register_new_resolver("capflow.job_dir", job_dir_name)


# Options that can bring in a primary config other than capflow's, which might set hydra.mode.
_OTHER_CONFIG_OPTIONS = ("--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp")


def skip_mode_probe(argv: list[str]) -> bool:
    """Spare Hydra its first of two config compositions, when its answer is known.

    Before a run, Hydra composes the whole config once only to read ``hydra.mode``, then
    composes it again to run: about 0.15 s of start-up each. capflow's own config files never
    set ``hydra.mode``, and Hydra treats "not set" exactly as this probe's answer of None (a
    run, or a sweep with ``-m``). So the probe is skipped when the command line keeps to
    capflow's own files: no ``hydra.mode`` or ``hydra.searchpath`` override, no primary config
    of the user's own, no config group option other than capflow's (a plugin's might set the
    mode), and no group added with ``+``. Returns whether the probe was skipped.
    """
    groups, keys = _own_config()
    for arg in argv:
        option = arg.split("=", 1)[0]
        if "hydra.mode" in arg or "hydra.searchpath" in arg or option in _OTHER_CONFIG_OPTIONS:
            return False
        if arg.startswith("-") or ("=" not in arg and not arg.startswith(("+", "~"))):
            continue  # -m, --multirun and the like
        key = option.lstrip("+~")
        if "." in key:
            continue  # a value inside the config: it cannot select files
        if option != key:
            return False  # +group=option, ~group: may bring in a file that sets the mode
        value = arg.partition("=")[2]
        if key in groups:
            if "(" in value or any(v.strip() not in groups[key] for v in value.split(",")):
                return False  # an option from elsewhere, or a sweep function
        elif key not in keys:
            return False  # a plugin's group, most likely
    from hydra._internal.hydra import Hydra

    if not callable(getattr(Hydra, "get_mode", None)):
        return False  # a Hydra without the probe: nothing to skip

    def get_mode(self: Hydra, config_name: str | None, overrides: list[str]) -> None:
        return None

    Hydra.get_mode = get_mode  # type: ignore[method-assign]
    return True


def _own_config() -> tuple[dict[str, set[str]], set[str]]:
    """capflow's config groups with their option names, and the top-level keys of
    ``config.yaml``."""
    conf = resources.files("capflow.conf")
    groups = {
        d.name: {f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml")}
        for d in conf.iterdir() if d.is_dir() and not d.name.startswith("_")
    }
    keys = set()
    for line in (conf / "config.yaml").read_text().splitlines():
        if line[:1].isalpha() and ":" in line:
            keys.add(line.split(":", 1)[0].strip())
    return groups, keys


def report_in_one_line(job_started: Callable[[], bool]) -> None:
    """Hydra's errors about the command line and the config (an unknown key or option, an
    override it cannot parse) as one line, ``capflow: error: ...``, and exit status 2.

    Hydra prints such an error over several lines, with advice capflow does not follow (add
    the key with +). Most are caught before Hydra runs (``capflow.mistakes``); these are the
    ones only composing the config finds, e.g. in a primary config of the user's own. Errors
    raised once a job runs, and every error with ``HYDRA_FULL_ERROR=1``, are Hydra's to report.
    """
    from hydra._internal import utils
    from hydra.errors import CompactHydraException

    original = utils.run_and_report
    if getattr(original, "capflow_one_line", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as exc:
            if (job_started() or not isinstance(exc, CompactHydraException)
                    or os.environ.get("HYDRA_FULL_ERROR") == "1"):
                return original(functools.partial(_raise, exc))
            from capflow.suggest import hydra_error_line

            print(f"capflow: error: {hydra_error_line(exc)}", file=sys.stderr)
            sys.exit(2)

    run_and_report.capflow_one_line = True  # type: ignore[attr-defined]
    utils.run_and_report = run_and_report


def _raise(exc: BaseException) -> None:
    raise exc


def show_resolved_config() -> None:
    """``--cfg`` shows the config with its interpolations resolved, ``--resolve`` or not:
    ``input: ${capflow.sample:}`` is shown as the sample's path, ``${api_url}`` as its value.

    What cannot be resolved is shown as written rather than failing the whole display, and
    so are environment lookups (``${oc.env:...}``): a variable may hold a secret, and this
    output goes to terminals and logs.
    """
    from hydra._internal.hydra import Hydra

    original = Hydra.show_cfg
    if getattr(original, "capflow_resolved", False):
        return

    def show_cfg(self: Hydra, config_name: str | None, overrides: list[str], cfg_type: str,
                 package: str | None, resolve: bool = False) -> None:
        # Hydra's show_cfg resolves with OmegaConf.resolve when asked to: this one, for the
        # duration of the call, is resolve_what_it_can.
        real_resolve = OmegaConf.resolve
        OmegaConf.resolve = resolve_what_it_can  # type: ignore[method-assign]
        try:
            original(self, config_name=config_name, overrides=overrides, cfg_type=cfg_type,
                     package=package, resolve=True)
        finally:
            OmegaConf.resolve = real_resolve  # type: ignore[method-assign]

    show_cfg.capflow_resolved = True  # type: ignore[attr-defined]
    Hydra.show_cfg = show_cfg  # type: ignore[method-assign]


def resolve_what_it_can(cfg: Any) -> None:
    """Resolve the interpolations of a config in place, leaving as written those that fail
    and those that read the environment."""
    from omegaconf import flag_override
    from omegaconf.resolvers import oc

    def refuse(*_: Any) -> Any:
        raise LookupError("environment variables are not shown")

    OmegaConf.register_new_resolver("oc.env", refuse, replace=True)
    try:
        with flag_override(cfg, "readonly", False):
            _resolve_in_place(cfg)
    finally:
        OmegaConf.register_new_resolver("oc.env", oc.env, replace=True)


def _resolve_in_place(node: Any) -> None:
    from omegaconf import Container, DictConfig

    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    # The ignores below: omegaconf annotates is_interpolation's key as int | str, narrower than
    # the keys a DictConfig has (DictKeyType), which it accepts all the same.
    for key in keys:
        if OmegaConf.is_missing(node, key):
            continue
        if OmegaConf.is_interpolation(node, key):  # type: ignore[arg-type]
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 - whatever it is, the text as written is shown
                continue
            if isinstance(value, str) and "${" in value:
                continue  # an escaped interpolation: assigned back, it would become one
            node[key] = value
        interpolated = OmegaConf.is_interpolation(node, key)  # type: ignore[arg-type]
        child = node[key] if not interpolated else None
        if isinstance(child, Container):
            _resolve_in_place(child)
