"""capflow's config as its files say it, read without Hydra: the root ``config.yaml`` and every
option of every config group (capflow's ``conf/`` and what the plugins add), with where each
comes from.

``capflow --help`` and the command-line checks (``capflow.mistakes``) read these. It is plain
file and YAML work, a few milliseconds, so neither has to wait for Hydra to compose a config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from capflow.plugins import BUILTIN_CONFIG, PluginRegistry

_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")


@dataclass(frozen=True)
class Option:
    """The option ``group=name``: a YAML file on the search path, or a node a plugin stored."""

    group: str
    name: str
    plugin: str  # who provides it; "capflow" for capflow's own options
    file: Any = None  # a Traversable or Path, for a YAML option
    node: Any = None  # a dict or a dataclass, for a ConfigStore node

    def text(self) -> str:
        """The YAML text ("" for a node)."""
        return self.file.read_text(encoding="utf-8") if self.file is not None else ""

    def description(self) -> str:
        """One line saying what the option is: its file's first comment line, or a node's
        docstring; "" when it has none."""
        line = first_comment(self.text()) if self.file is not None else _docstring(self.node)
        # "serving=echo: answers locally" says its name twice where the name is listed anyway.
        prefix = f"{self.group}={self.name}:"
        return line[len(prefix):].strip() if line.startswith(prefix) else line


def first_comment(text: str) -> str:
    """The first comment line at the top of a YAML text, ``@package`` directives skipped."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("#"):
            return ""
        if not _PACKAGE.match(stripped):
            return stripped.lstrip("#").strip()
    return ""


def package_directive(text: str) -> str | None:
    """The ``# @package`` of a YAML option (``_global_``, say), when its header sets one."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return None
        match = _PACKAGE.match(stripped)
        if match:
            return match[1]
    return None


def _docstring(node: Any) -> str:
    doc = getattr(node, "__doc__", None) if dataclasses.is_dataclass(node) else None
    if not doc:
        return ""
    cls = node if isinstance(node, type) else type(node)
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses write when there is none
        return ""
    return doc.strip().splitlines()[0].strip()


def conf_root() -> Any:
    """capflow's own config tree (the repository's ``conf/``, shipped as ``capflow.conf``)."""
    return resources.files("capflow.conf")


def root_text() -> str:
    """The text of capflow's root config, ``config.yaml``."""
    return (conf_root() / "config.yaml").read_text(encoding="utf-8")


def tree_root(path: str) -> Any:
    """The folder a search-path entry (``pkg://package`` or ``file://dir``) names."""
    if path.startswith("pkg://"):
        return resources.files(path[len("pkg://"):].strip("/").replace("/", "."))
    return Path(path.removeprefix("file://"))


def tree_options(root: Any, plugin: str) -> Iterator[Option]:
    """The options a YAML tree provides: each folder is a group (nested ones joined by ``/``),
    each YAML file in it an option."""

    def walk(node: Any, group: str) -> Iterator[Option]:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")):
                yield from walk(child, f"{group}/{child.name}" if group else child.name)
            elif group and child.name.endswith((".yaml", ".yml")):
                yield Option(group, child.name.rsplit(".", 1)[0], plugin, file=child)

    try:
        yield from walk(root, "")
    except OSError:  # a search path that is not there: Hydra says so, if it matters
        return


def all_options(registry: PluginRegistry, extra_paths: Iterable[str] = ()
                ) -> dict[str, dict[str, Option]]:
    """Every group's options by name, in the order Hydra looks them up (capflow's own, the
    plugins' nodes, the plugins' YAML trees, then ``extra_paths``, e.g. a command line's
    ``hydra.searchpath``); the first of a name wins, as in Hydra."""
    found: dict[str, dict[str, Option]] = {}

    def add(option: Option) -> None:
        found.setdefault(option.group, {}).setdefault(option.name, option)

    for option in tree_options(tree_root(BUILTIN_CONFIG), "capflow"):
        add(option)
    for group, name, node in registry.nodes:
        add(Option(group, name, registry.options.get((group, name), "?"), node=node))
    for path in registry.search_paths:
        for option in tree_options(tree_root(path), "?"):
            add(dataclasses.replace(
                option, plugin=registry.options.get((option.group, option.name), "?")))
    for path in extra_paths:
        for option in tree_options(tree_root(path), "command line"):
            add(option)
    return found


def load_yaml(text: str) -> Any:
    """YAML text as Python data (libyaml's loader when there is one: a few times faster)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


def node_shape(node: Any) -> Any:
    """A node's keys as nested dicts (a dataclass's fields, a dict as it is); None when its
    shape cannot be known from here."""
    if isinstance(node, dict):
        return node
    if dataclasses.is_dataclass(node):
        shape: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            if dataclasses.is_dataclass(f.type) or f.default is dataclasses.MISSING:
                shape[f.name] = UNKNOWN  # a nested node, or a factory's value: not known here
            else:
                shape[f.name] = f.default
        return shape
    return None


class _Unknown:
    """A part of the config whose keys cannot be known without composing it."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()
