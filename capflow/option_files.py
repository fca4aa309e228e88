"""A config group's option from a file: ``capflow prompt=path/to/my_prompt.yaml``.

Hydra chooses a group's options by name from its search path. A value that is the path of a
YAML file becomes an option of that group named after the file (``my_prompt``; ``my_prompt_1``
when a shipped option has that name), so a prompt or a pipeline of one's own needs no plugin
and no folder layout. It works in sweeps too: ``-m prompt=concise,mine.yaml``.
"""

from __future__ import annotations

import os
import re

from capflow.config_sources import all_options
from capflow.errors import ConfigError
from capflow.plugins import PluginRegistry

_OPTION = re.compile(r"^(\+{0,2})([A-Za-z_][\w/]*)=(.+)$")
_UNSAFE = re.compile(r"[^\w-]+")

# The command line as it was typed, before paths were replaced by option names.
typed_argv: list[str] | None = None


def adopt(argv: list[str], overrides: list[str], registry: PluginRegistry) -> list[str]:
    """``argv`` with every ``group=<file>.yaml`` turned into ``group=<name>`` and the file
    registered as that option; ``overrides`` are the arguments Hydra reads as overrides.

    :raises ConfigError: a file that is not a YAML mapping.
    """
    global typed_argv
    known = None
    out = []
    changed = False
    wanted = set(overrides)
    for arg in argv:
        match = _OPTION.match(arg) if arg in wanted else None
        if match is None or not _names_a_file(match[3]):
            out.append(arg)
            continue
        if known is None:
            known = all_options(registry)
        prefix, group, value = match[1], match[2], match[3]
        names = []
        for choice in value.split(","):
            if not _is_yaml_file(choice):
                names.append(choice)
                continue
            taken = set(known.get(group, {}))
            name = _free_name(_UNSAFE.sub("_", os.path.splitext(os.path.basename(choice))[0]),
                              taken)
            registry.nodes.append((group, name, _load(choice, group)))
            registry.options[(group, name)] = f"file {choice}"
            known = all_options(registry)
            names.append(name)
        out.append(f"{prefix}{group}={','.join(names)}")
        changed = True
    if changed:
        typed_argv = list(argv)
    return out


def _names_a_file(value: str) -> bool:
    return any(_is_yaml_file(choice) for choice in value.split(","))


def _is_yaml_file(choice: str) -> bool:
    return choice.endswith((".yaml", ".yml")) and os.path.isfile(choice)


def _free_name(stem: str, taken: set[str]) -> str:
    name, n = stem or "file", 0
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    return name


def _load(path: str, group: str) -> dict:
    from capflow.config_sources import load_yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f.read())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{group}={path}: cannot read it: {exc}") from None
    except Exception as exc:  # yaml's errors: say where, in one line
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{group}={path} is not valid YAML: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{group}={path} must hold a mapping of keys (like"
                          f" conf/{group}/*.yaml), not {type(data).__name__}")
    return data
