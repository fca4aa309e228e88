"""``capflow --help``: what can be set and chosen, each with a line saying what it does.

The text is built from the YAML files themselves, without composing a config (no Hydra, no
server, a few milliseconds): each group's options with the first comment line of their files
(plugins' options too), and each key of ``config.yaml`` with its default and the comment at the
end of its line. The header and footer are ``hydra.help.header`` and ``hydra.help.footer`` of
``config.yaml``. Hydra's own ``--hydra-help`` stays Hydra's.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capflow import config_sources as sources
from capflow.config_sources import Option
from capflow.plugins import PluginRegistry

WIDTH = 100
KEY_COLUMN = 30  # where a key's comment starts

_KEY_LINE = re.compile(r"^( *)([A-Za-z_][\w-]*):(?:[ \t]+(.*))?$")
_DEFAULTS_ITEM = re.compile(r"^\s*-\s+(?:(?:optional|override)\s+)?([\w/]+)\s*:\s*([\w/.-]+)")

COMMANDS = (
    ("capflow [key=value ...]", "run; a dry run, sending nothing, while api_url is not set"),
    ("capflow -m key=a,b ...", "a sweep: one job, with its own output, per combination"),
    ("capflow --cfg job [key=value ...]",
     "the config a run would use, resolved (environment variables stay as written)"),
    ("capflow plugins", "the installed plugins and what each provides"),
    ("capflow plugins new NAME --dir DIR", "a new plugin package to start from (--kind serving,"
     " storage, operator or observer), with tests"),
    ("capflow models [api_url=...]", "the models the server offers"),
    ("capflow show OUTPUT [--html FILE]",
     "counts, failures by type and sample captions of an output; --html writes a gallery page"),
    ("capflow compare OUTPUTS --out DIR", "outputs side by side: figures, charts, answers"),
    ("capflow batches cancel OUTPUT", "cancel the batches a serving=openai_batch run left"
     " running"),
    ("capflow --hydra-help", "Hydra's own flags (--info, --package, --config-dir, ...)"),
    ("capflow --version", ""),
)


@dataclass(frozen=True)
class Entry:
    """One key line of a YAML file: its dotted path, value as written, and end-of-line
    comment (the value is "" for a key that opens a block of keys)."""

    path: str
    value: str
    comment: str


def render(registry: PluginRegistry) -> str:
    """The whole help text."""
    text = sources.root_text()
    settings = sources.load_yaml(text).get("hydra", {}).get("help", {})
    parts = [str(settings.get("header", "")).rstrip(), _commands(),
             _groups(text, sources.all_options(registry)), _keys(text),
             str(settings.get("footer", "")).rstrip(), _docs()]
    return "\n\n".join(p for p in parts if p) + "\n"


def _commands() -> str:
    lines = ["== Commands =="]
    for command, what in COMMANDS:
        lines += _columns(command, what, 36)
    return "\n".join(lines)


def _groups(text: str, options: dict[str, dict[str, Option]]) -> str:
    defaults = {m[1]: (m[2], _comment(line)) for line in _section(text, "defaults")
                if (m := _DEFAULTS_ITEM.match(line))}
    order = [g for g in defaults if g in options] + sorted(g for g in options if g not in defaults)
    lines = ["== Config groups (choose one option with group=option) =="]
    # One column for every group's descriptions, unless a long name would push it too far.
    width = min(max((len(n) for names in options.values() for n in names), default=0), 20)
    for group in order:
        # "group: a, b" alone on its line: scripts (and tests) read the options from it.
        lines.append(f"{group}: {', '.join(sorted(options[group]))}")
        default, about = defaults.get(group, (None, ""))
        if about or default:
            lines += _wrap(about + (f" (default: {default})" if default else ""), "  ")
        for name in sorted(options[group]):
            option = options[group][name]
            description = option.description()
            if option.plugin != "capflow" and "plugin" not in description:
                description += f" (from the plugin {option.plugin})"
            lines += _columns(name, description, 4 + width + 2, indent="    ")
    return "\n".join(lines)


def _keys(text: str) -> str:
    lines = ["== Config (override any value with key=value) =="]
    for entry in outline(text):
        top = entry.path.split(".", 1)[0]
        if top in ("defaults", "hydra") or entry.path.rsplit(".", 1)[-1] == "_target_":
            continue
        depth = entry.path.count(".")
        indent = "  " * depth
        if entry.value:
            lines += _columns(f"{entry.path}={entry.value}", entry.comment, KEY_COLUMN, indent)
        else:  # a block: its keys follow, each with its full path
            lines += _columns(f"{entry.path}:", entry.comment, KEY_COLUMN, indent)
    return "\n".join(lines)


def _docs() -> str:
    """Where the documentation is: this checkout's files when capflow runs from one."""
    root = Path(__file__).resolve().parents[1]
    where = f"in {root}" if (root / "README.md").is_file() else "in the capflow repository"
    text = (f"Docs: README.md (start here), docs/architecture.md (how capflow works) and"
            f" docs/plugins.md (writing plugins), {where}")
    # A long path stays whole, even past the width: it is there to be copied.
    return "\n".join(textwrap.wrap(text, WIDTH, subsequent_indent="      ",
                                   break_long_words=False, break_on_hyphens=False))


def outline(text: str) -> Iterator[Entry]:
    """The key lines of a YAML text, nested keys as dotted paths; block scalars (``|``,
    ``>``) and list items are passed over. Enough for capflow's own config files, which is
    all it reads."""
    stack: list[tuple[int, str]] = []
    scalar_indent: int | None = None  # inside a block scalar deeper than this
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if scalar_indent is not None:
            if indent > scalar_indent:
                continue
            scalar_indent = None
        match = _KEY_LINE.match(line)
        if not match:
            continue  # a list item, or a flow collection's continuation
        while stack and stack[-1][0] >= indent:
            stack.pop()
        value, comment = _split_comment(match[3] or "")
        path = ".".join([*(key for _, key in stack), match[2]])
        if value[:1] in ("|", ">"):
            scalar_indent = indent
        stack.append((indent, match[2]))
        yield Entry(path, value, comment)


def _section(text: str, key: str) -> list[str]:
    """The lines of a top-level key's block."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"{key}:")), None)
    if start is None:
        return []
    block = []
    for line in lines[start + 1:]:
        if line[:1] not in (" ", "-", "#", ""):
            break
        block.append(line)
    return block


def _comment(line: str) -> str:
    return _split_comment(line)[1]


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` as (value, comment); a ``#`` inside quotes or a word is no
    comment."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _columns(left: str, right: str, column: int, indent: str = "") -> list[str]:
    """``left`` then ``right`` from ``column`` on, wrapped to WIDTH; ``right`` goes on the
    next line when ``left`` does not leave it room."""
    head = f"{indent}{left}"
    if not right:
        return [head]
    pad = " " * max(column, len(indent) + 2)
    wrapped = textwrap.wrap(right, WIDTH - len(pad)) or [""]
    if len(head) + 2 <= len(pad):
        first = head.ljust(len(pad)) + wrapped[0]
        return [first, *(pad + w for w in wrapped[1:])]
    return [head, *(pad + w for w in wrapped)]


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent)
