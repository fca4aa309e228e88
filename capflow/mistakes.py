"""Mistakes on the command line, found before Hydra runs: a misspelt key, an option that is not
installed, a new top-level key added with ``+``. Each is one line, and the run never starts.

The known keys come from the files Hydra would compose (``capflow.config_sources``): the root
``config.yaml`` and the options chosen for each group, capflow's or a plugin's. Whatever cannot
be known without composing (a primary config of the user's own, an option that composes others)
is left to Hydra, whose errors ``capflow.suggest.hydra_error_line`` turns into one line too.

What ``+`` may add: a config group (``+group=option``), a key a plugin declares at the top level
(in an option of its own with ``# @package _global_``), and any key below the top level
(``+serving.extra_body.top_k=20``). A new top-level key would be silently ignored by every part
of capflow, so ``+max_worker=5`` is refused like ``max_worker=5``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from capflow import config_sources as sources
from capflow.config_sources import UNKNOWN, Option
from capflow.plugins import PluginRegistry

# Hydra's options that take a value as the next argument (or after "=").
_VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                  "-cn", "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
# Options after which the command line is not capflow's to judge: a primary config of the
# user's own (whose keys and groups only Hydra knows), or no config composed at all.
_HANDS_OFF = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
              "--experimental-rerun", "--hydra-help", "--shell-completion", "-sc"}
_OVERRIDE = re.compile(r"^(\+\+|\+|~)?([^=]+?)(?:=(.*))?$", re.DOTALL)
_SIMPLE_CHOICE = re.compile(r"^[\w./-]+$")
_NODE_REFERENCE = re.compile(r"^\$\{([\w.]+)\}$")


class Override(NamedTuple):
    """One ``key=value`` argument: ``prefix`` is "", "+", "++" or "~"; ``value`` None when
    there is none (``~key``)."""

    prefix: str
    key: str
    value: str | None

    @classmethod
    def parse(cls, arg: str) -> Override | None:
        match = _OVERRIDE.match(arg)
        if not match or (match[1] != "~" and match[3] is None):
            return None
        return cls(match[1] or "", match[2].strip(), match[3])

    def choices(self) -> list[str] | None:
        """The options a group override chooses, or None for a value capflow leaves to Hydra
        (a sweep function, a list, an interpolation, null)."""
        if self.value is None:
            return []
        values = [v.strip() for v in self.value.split(",")]
        if not all(_SIMPLE_CHOICE.match(v) for v in values) or "null" in values:
            return None
        return values


def overrides(argv: list[str]) -> Iterator[str]:
    """The arguments Hydra takes as overrides (not its options, nor their values)."""
    takes_value = False
    for arg in argv:
        if takes_value:
            takes_value = False
        elif arg.startswith("-"):
            takes_value = arg in _VALUE_OPTIONS  # "--cfg=job" carries its value
        else:
            yield arg


def check(argv: list[str], registry: PluginRegistry) -> str | None:
    """The first mistake on the command line, as one line; None when capflow finds none."""
    if any(arg.split("=", 1)[0] in _HANDS_OFF for arg in argv):
        return None
    parsed = [Override.parse(arg) for arg in overrides(argv)]
    if not parsed:
        return None
    if any(o is None for o in parsed):
        return None  # not an override Hydra's grammar takes: Hydra says what is wrong
    model = KnownConfig.load(registry, [o for o in parsed if o is not None])
    if model is None:
        return None
    for override in parsed:
        assert override is not None
        problem = model.problem(override)
        if problem:
            return problem
    return None


class KnownConfig:
    """The shape of the config a command line composes, as far as files tell it."""

    def __init__(self, root: dict[str, Any], defaults: dict[str, str | None],
                 options: dict[str, dict[str, Option]]) -> None:
        self.root = root  # config.yaml without defaults and hydra
        self.defaults = defaults  # group -> its default option (None: not known)
        self.options = options  # every group's options
        # group -> the options chosen for it (None: not known, a sweep function say)
        self.chosen: dict[str, list[str] | None] = {}

    @classmethod
    def load(cls, registry: PluginRegistry, parsed: list[Override]) -> KnownConfig | None:
        """The known config for these overrides; None when it cannot be known from files."""
        extra = []
        for o in parsed:
            if o.key == "hydra.searchpath":
                paths = _search_paths(o.value or "")
                if paths is None:
                    return None
                extra += paths
        root = sources.load_yaml(sources.root_text())
        if not isinstance(root, dict):
            return None
        defaults = _defaults(root.pop("defaults", []))
        if defaults is None:
            return None
        root.pop("hydra", None)
        model = cls(root, defaults, sources.all_options(registry, extra))
        for group, default in defaults.items():
            model.chosen[group] = [default] if default else None
        for o in parsed:
            if o.key in model.options:
                if o.prefix == "~":
                    model.chosen.pop(o.key, None)
                elif o.prefix or o.key in model.chosen:  # else Hydra refuses it (below)
                    model.chosen[o.key] = o.choices()
        for group, names in model.chosen.items():
            for name in names or ():
                option = model.options.get(group, {}).get(name)
                if option is not None and option.file is not None:
                    text = option.text()
                    if sources.package_directive(text) == "_global_":
                        shape = sources.load_yaml(text)
                        if isinstance(shape, dict):  # its keys join the top level
                            model.root.update({k: UNKNOWN for k in shape if k != "defaults"})
        return model

    def problem(self, o: Override) -> str | None:
        """What is wrong with one override, or None."""
        head = re.split(r"[./]", o.key, maxsplit=1)[0]
        if head == "hydra" or "@" in o.key:
            return None  # Hydra's own settings, or a package override: Hydra judges them
        if o.key in self.options:
            return self._group_problem(o)
        if "/" in o.key:
            return None  # a group path capflow does not know of: Hydra says
        path = o.key.split(".")
        adding = o.prefix in ("+", "++")
        top = path[0]
        if top in self.root or top in self.chosen:
            if len(path) == 1:
                if o.prefix == "+":
                    return (f"{top} is already in the config: set it without the +"
                            f" ({top}={o.value})")
                return None
            return self._walk(self._shape(top), path, adding)
        declared = self._declared_by_plugins() if adding else set()
        if top in declared:
            return None
        if any(g.split("/")[0] == top for g in self.options):
            return f"{top} is a config group that is not chosen: add it with +{top}=<option>"
        known = (set(self.root) | set(self.chosen) | declared
                 | {g.split("/")[0] for g in self.options})
        line = _suggest().unknown_key(top, known)
        if adding and " did you mean " not in line:
            line += "; + adds only config groups and keys that plugins declare"
        return line

    def _group_problem(self, o: Override) -> str | None:
        group = o.key
        if o.prefix == "" and group not in self.chosen:
            # Hydra changes only a group that the defaults list has; a plugin's extra group
            # must be added.
            choice = o.value or "..."
            return f"{group} is not chosen by default: add it with +{group}={choice}"
        for choice in o.choices() or []:
            if choice not in self._choices(group):
                return _suggest().unknown_option(group, choice, self._choices(group))
        return None

    def _choices(self, group: str) -> set[str]:
        """A group's options as they can be chosen, nested groups' as ``sub/option``."""
        found: set[str] = set()
        for name, options in self.options.items():
            if name == group or name.startswith(f"{group}/"):
                sub = name[len(group) + 1:]
                found.update(f"{sub}/{n}" if sub else n for n in options)
        return found

    def _shape(self, top: str) -> Any:
        """The keys under a top-level key: config.yaml's, or the chosen option(s) of a group."""
        if top not in self.chosen:
            return self.root.get(top)
        names = self.chosen[top]
        if names is None:
            return UNKNOWN
        shape: dict[str, Any] = {}
        for name in names:
            option = self.options.get(top, {}).get(name)
            if option is None:
                return UNKNOWN  # reported as an unknown option, or Hydra's to judge
            if option.file is not None:
                text = option.text()
                if sources.package_directive(text) is not None:
                    return UNKNOWN  # the option's keys go elsewhere
                part = sources.load_yaml(text) or {}
            else:
                part = sources.node_shape(option.node)
            if not isinstance(part, dict) or "defaults" in part:
                return UNKNOWN  # it composes other options: only Hydra knows the keys
            shape.update(part)
        return shape

    def _walk(self, shape: Any, path: list[str], adding: bool) -> str | None:
        """Follow ``path`` below its top-level key through ``shape``."""
        for depth in range(1, len(path)):
            where = ".".join(path[:depth])
            if shape is UNKNOWN:
                return None
            if isinstance(shape, dict):
                if path[depth] in shape:
                    shape = shape[path[depth]]
                    continue
                if adding:
                    return None  # a new key inside a node: capflow leaves it to the node
                return _suggest().unknown_key(".".join(path[:depth + 1]), map(str, shape))
            if adding or isinstance(shape, list):
                return None  # an addition, or an item of a list: Hydra judges it
            return self._into_a_value(where, shape, ".".join(path[depth:]))
        return None

    def _into_a_value(self, where: str, value: Any, rest: str) -> str:
        """The line for ``where.rest=...`` when ``where`` holds a value, not keys."""
        path = f"{where}.{rest}"
        reference = _NODE_REFERENCE.match(value) if isinstance(value, str) else None
        if reference:  # image_io: ${image} takes everything from image
            target = f"{reference[1]}.{rest}"
            problem = self.problem(Override("", target, ""))
            return (f"unknown key {path}: {where} is {value}; "
                    + (problem or f"did you mean {target}?"))
        if value is None:  # extra_body: null takes keys, but only added ones
            return f"unknown key {path}: {where} is null; add a key to it with +{path}=..."
        return f"unknown key {path}: {where} is a value ({value!r}), it has no keys"

    def _declared_by_plugins(self) -> set[str]:
        """Top-level keys that plugins' options declare (``# @package _global_``)."""
        declared: set[str] = set()
        for options in self.options.values():
            for option in options.values():
                if option.plugin == "capflow" or option.file is None:
                    continue
                text = option.text()
                if sources.package_directive(text) == "_global_":
                    shape = sources.load_yaml(text)
                    if isinstance(shape, dict):
                        declared.update(str(k) for k in shape if k != "defaults")
        return declared


def _defaults(items: Any) -> dict[str, str | None] | None:
    """config.yaml's defaults list as group -> option; None for a list capflow cannot read."""
    if not isinstance(items, list):
        return None
    found: dict[str, str | None] = {}
    for item in items:
        if isinstance(item, str):
            continue  # _self_, or a config merged in
        if not isinstance(item, dict) or len(item) != 1:
            return None
        [(key, value)] = item.items()
        group = str(key).split()[-1]  # "optional group", "override group"
        if "@" in group:
            return None
        found[group] = str(value) if isinstance(value, str) else None
    return found


def _search_paths(value: str) -> list[str] | None:
    """The entries of a ``hydra.searchpath=[...]`` value; None when it is not a plain list."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")) or "$" in value:
        return None
    entries = [e.strip().strip("'\"") for e in value[1:-1].split(",") if e.strip()]
    if not all(e.startswith(("file://", "pkg://")) for e in entries):
        return None
    return entries


def _suggest() -> Any:
    # Imported only when there is a mistake to report: a good command line never needs it.
    from capflow import suggest

    return suggest
