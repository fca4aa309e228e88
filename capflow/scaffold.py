"""``capflow plugins new NAME --dir DIR [--kind KIND]``: write a new plugin package to start from.

The package, ``DIR/capflow-NAME``, works as written: ``pip install -e`` installs it, ``capflow
plugins`` lists it, its example (a serving, a storage, a pipeline step or an observer) runs
through the real ``capflow`` command and its tests pass. It is laid out like the example plugin
``plugins/capflow-echo`` and registers what it provides through the same hooks as capflow's own
plugins, so that what is left to do is to replace the example with the real thing.

Its files are the templates in ``capflow/scaffold_templates``, with their ``{{placeholders}}``
filled in.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import NoReturn

from capflow.errors import CapflowError

EXIT_OK, EXIT_ERROR = 0, 2
USAGE = "capflow plugins new NAME --dir DIR [--kind serving|storage|operator|observer]"
# The name is the entry point's, the config option's and, with "-" as "_", the module's: one
# that is all of these at once, and short enough for the generated lines to stay within 100.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")
MAX_NAME = 24
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class ScaffoldError(CapflowError):
    """Why the package cannot be written, as one line for the command's error message."""


@dataclass(frozen=True)
class Kind:
    """One kind of plugin: what its example is, and the config option it adds.

    The strings may hold ``{{name}}``-style placeholders, filled in like the templates.
    """

    summary: str  # what the plugin is, for pyproject's description and the README
    group: str  # the config group of its option
    option: str  # the option's name in that group
    component: str | None  # what it registers its class as (an observer registers none)
    contents: str  # what its module holds, for the README
    example: str  # a command line using it
    dependencies: tuple[str, ...] = ("capflow",)


KINDS: dict[str, Kind] = {
    "serving": Kind(
        summary="a serving that answers locally with each image's size",
        group="serving", option="{{name}}", component="serving",
        contents="the serving class `{{cls}}Serving`",
        example="capflow serving={{name}} input=data.jsonl output=out.jsonl",
        dependencies=("capflow", "pillow"),
    ),
    "storage": Kind(
        summary="a storage reading image paths from a text file and writing a TSV file",
        group="storage", option="{{name}}", component="storage",
        contents="the storage class `{{cls}}Storage`",
        example=("capflow storage={{name}} input=images.txt output=captions.tsv"
                 " api_url=http://127.0.0.1:8000/v1"),
    ),
    "operator": Kind(
        summary="a pipeline step adding each image file's size to its row, without a request",
        group="pipeline", option="{{name}}", component="operator",
        contents="the step class `{{cls}}Step`",
        example=("capflow pipeline={{name}} input=data.jsonl output=out.jsonl"
                 " api_url=http://127.0.0.1:8000/v1"),
    ),
    "observer": Kind(
        summary="an observer appending each run's counts to a JSON Lines file",
        group="{{name}}", option="on", component=None,
        contents="the observer (`RunLog`, called by the three observer hooks)",
        example=("capflow +{{name}}=on input=data.jsonl output=out.jsonl"
                 " api_url=http://127.0.0.1:8000/v1"),
    ),
}
DEFAULT_KIND = "serving"


@dataclass(frozen=True)
class Plugin:
    """The plugin to write: its name and kind, and the names derived from them."""

    name: str
    kind: str

    @property
    def dist(self) -> str:
        """The distribution's name, what ``pip`` installs, in the normalized form that
        ``capflow plugins`` shows (``my_name`` gives ``capflow-my-name``)."""
        return f"capflow-{self.name.replace('_', '-')}"

    @property
    def module(self) -> str:
        """The module the entry point names."""
        return f"capflow_{self.name.replace('-', '_')}"

    @property
    def cls(self) -> str:
        """The prefix of the example's class name: ``my-echo`` gives ``MyEcho``."""
        return "".join(part.capitalize() for part in re.split(r"[-_]", self.name))

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]

    def fill(self, text: str, **more: str) -> str:
        """``text`` with its placeholders filled in; a value is not searched for more."""
        values = {"name": self.name, "dist": self.dist, "module": self.module, "cls": self.cls,
                  **more}
        return _PLACEHOLDER.sub(lambda match: values[match[1]], text)

    @property
    def group(self) -> str:
        return self.fill(self.spec.group)

    @property
    def option(self) -> str:
        """The config option it adds, as chosen on the command line: ``serving=NAME``."""
        return f"{self.group}={self.fill(self.spec.option)}"

    @property
    def option_file(self) -> str:
        """Its option's YAML file, relative to the config tree ``MODULE/conf``."""
        return f"{self.group}/{self.fill(self.spec.option)}.yaml"

    def provides(self) -> list[str]:
        """What ``capflow plugins`` lists under it once installed."""
        component = [f"{self.spec.component} {self.name}"] if self.spec.component else []
        return [*component, self.option]


# -- checks ----------------------------------------------------------------------------------


def check_name(name: str) -> None:
    """Refuse a name that cannot be a plugin's entry point, config option and module name."""
    if name.startswith(("capflow-", "capflow_")):
        raise ScaffoldError(f"leave out the prefix of {name!r}: the package is named"
                            f" capflow-NAME, so NAME is {name[len('capflow-'):]!r}")
    if not NAME_PATTERN.fullmatch(name) or len(name) > MAX_NAME:
        raise ScaffoldError(
            f"invalid plugin name {name!r}: use up to {MAX_NAME} lowercase letters, digits, '-'"
            " and '_', starting with a letter and ending with a letter or digit (e.g. my-serving)"
        )


def check_target(target: Path) -> None:
    """Refuse to write into anything but a missing or empty folder."""
    if target.is_dir() and not any(target.iterdir()):
        return
    if target.exists() or target.is_symlink():
        what = "is not empty" if target.is_dir() else "is not a folder"
        raise ScaffoldError(f"{target} already exists and {what}: choose another --dir or"
                            " name, or remove it first")


def check_free(plugin: Plugin) -> None:
    """Refuse names that an installed plugin, or capflow itself, already uses: the new plugin
    would stop capflow with a clash as soon as it is installed."""
    problem = _entry_point_owner(plugin) or _in_use(plugin)
    if problem:
        raise ScaffoldError(f"the name {plugin.name!r} is taken: {problem}")


def _entry_point_owner(plugin: Plugin) -> str | None:
    """Another installed distribution already announcing the plugin name."""
    from capflow.plugins import ENTRY_POINT_GROUP

    for dist in metadata.distributions():
        owner = str(dist.metadata["Name"] or "")
        if _canonical(owner) == _canonical(plugin.dist):
            continue  # an earlier version of this very plugin
        if any(ep.group == ENTRY_POINT_GROUP and ep.name == plugin.name
               for ep in dist.entry_points):
            return f"the installed distribution {owner!r} has a plugin of that name"
    return None


def _in_use(plugin: Plugin) -> str | None:
    """What already provides the plugin's class name or config option, or uses its config
    group (an observer's) as a group or key of its own."""
    options, components = _names_in_use()
    group, option = plugin.option.split("=", 1)
    owners = {owner for (g, _), owner in options.items() if g == group}
    if plugin.kind == "observer" and (owners - {plugin.name} or group in _root_keys()):
        return f"the config already has a key or group named {group!r}"
    owner = options.get((group, option))
    if owner not in (None, plugin.name):
        return f"the config option {plugin.option} comes from {_who(owner)}"
    owner = components.get((plugin.spec.component or "", plugin.name))
    if owner not in (None, plugin.name):
        return f"the {plugin.spec.component} {plugin.name!r} comes from {_who(owner)}"
    return None


def _names_in_use() -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """Config options and registered classes, each with the plugin providing it: those of
    every installed plugin, or capflow's own options when the installed plugins do not load."""
    from capflow.plugins import BUILTIN_CONFIG, _options_in_tree, load_plugins

    try:
        _, registry = load_plugins()
    except CapflowError:  # capflow says why at its next start; a new plugin is not to blame
        return {option: "capflow" for option in _options_in_tree(BUILTIN_CONFIG)}, {}
    components = {(kind, name): owner for kind, known in registry.components.items()
                  for name, (_, owner) in known.items()}
    return dict(registry.options), components


def _root_keys() -> set[str]:
    """The top-level keys of capflow's root config (``image``, ``retry``, ``defaults``...)."""
    from capflow import config_sources

    root = config_sources.load_yaml(config_sources.root_text())
    return set(root) if isinstance(root, dict) else set()


def _who(owner: str) -> str:
    return "capflow itself" if owner == "capflow" or owner.startswith("capflow.") else (
        f"the plugin {owner!r}")


def _canonical(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


# -- writing ---------------------------------------------------------------------------------


def template(path: str) -> str:
    """One template's text, shipped in ``capflow/scaffold_templates``."""
    return (resources.files("capflow") / "scaffold_templates" / path).read_text(
        encoding="utf-8")


def render(plugin: Plugin, install_path: str) -> dict[str, str]:
    """The package's files, by path relative to its folder, with their text."""
    kind, module = plugin.kind, plugin.module
    values = {
        "summary": plugin.fill(plugin.spec.summary),
        "option": plugin.option,
        "option_file": plugin.option_file,
        "install_path": shlex.quote(install_path),
        "contents": plugin.fill(plugin.spec.contents),
        "registers": " and ".join(f"`{item}`" for item in plugin.provides()),
        "dependencies": ", ".join(f'"{dep}"' for dep in plugin.spec.dependencies),
    }
    values["usage"] = plugin.fill(template(f"{kind}/usage.md.tmpl"), **values).rstrip("\n")
    sources = {
        "pyproject.toml": "common/pyproject.toml.tmpl",
        "README.md": "common/README.md.tmpl",
        f"{module}/__init__.py": f"{kind}/__init__.py.tmpl",
        f"{module}/conf/__init__.py": "common/conf_init.py.tmpl",
        f"{module}/conf/{plugin.option_file}": f"{kind}/option.yaml.tmpl",
        f"tests/test_{module}.py": f"{kind}/test.py.tmpl",
    }
    return {path: plugin.fill(template(source), **values) for path, source in sources.items()}


def new_plugin(name: str, directory: str | os.PathLike[str], kind: str = DEFAULT_KIND,
               ) -> list[Path]:
    """Write the plugin package ``directory/capflow-NAME``; returns the files written.

    Raises ``ScaffoldError`` for an invalid or taken name, an unknown kind, or a target that
    exists and is not an empty folder.
    """
    if kind not in KINDS:
        raise ScaffoldError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    check_name(name)
    plugin = Plugin(name, kind)
    target = Path(directory) / plugin.dist
    check_target(target)
    check_free(plugin)
    files = render(plugin, os.path.join(os.fspath(directory), plugin.dist))
    written = []
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def next_steps(plugin: Plugin, install_path: str) -> list[str]:
    """The commands that install the new package, run its tests and use it."""
    where = shlex.quote(install_path)
    listed = f"{plugin.name} ({plugin.dist} 0.1.0): {', '.join(plugin.provides())}"
    return [
        f"pip install -e {where}    # into the environment capflow runs in",
        f"cd {where} && python -m pytest -q",
        f"capflow plugins    # lists {listed}",
        plugin.fill(plugin.spec.example),
    ]


# -- the command -----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as capflow's one-line errors."""

    def error(self, message: str) -> NoReturn:
        raise ScaffoldError(f"{message} (usage: {USAGE})")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="capflow plugins new", usage=USAGE,
                     description="Write a new capflow plugin package, DIR/capflow-NAME, with a"
                                 " working example of its kind, its config option and tests.")
    parser.add_argument("name", metavar="NAME",
                        help="the plugin's name: its entry point and config option")
    parser.add_argument("--dir", required=True, metavar="DIR",
                        help="the folder to write capflow-NAME into")
    parser.add_argument("--kind", choices=list(KINDS), default=DEFAULT_KIND,
                        help=f"what the example is (default: {DEFAULT_KIND})")
    return parser


def main(argv: list[str]) -> int:
    """``capflow plugins new``: write the package, list its files and say what to do next."""
    try:
        args = _parser().parse_args(argv)
        written = new_plugin(args.name, args.dir, args.kind)
    except ScaffoldError as exc:
        print(f"capflow: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"capflow: error: cannot write {exc.filename or 'the package'}:"
              f" {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    plugin = Plugin(args.name, args.kind)
    install_path = os.path.join(args.dir, plugin.dist)
    print(f"Wrote {plugin.dist}, a capflow plugin adding {plugin.option}"
          f" ({plugin.kind}), in {install_path}:")
    for path in written:
        print(f"    {path}")
    print("Next steps:")
    for line in next_steps(plugin, install_path):
        print(f"    {line}")
    return EXIT_OK
