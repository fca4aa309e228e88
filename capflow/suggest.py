"""Did you mean: close matches for a misspelt key or option, as one line each.

``capflow.mistakes`` finds the mistakes before Hydra runs; ``hydra_error_line`` rewrites those
only Hydra finds (a user's own config files, say) from Hydra's exceptions. Both say it here, the
same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

# Options the README shows that come from a plugin in the capflow repository rather than from
# capflow itself: named with the way to install them when they are not installed.
EXAMPLE_PLUGINS = {("serving", "echo"): "capflow-echo"}

_MAX_LISTED = 12


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``word`` (difflib's ratio of at least 0.6), case aside."""
    by_lower: dict[str, str] = {}
    for candidate in sorted(set(candidates)):
        by_lower.setdefault(candidate.lower(), candidate)
    lower = word.lower()
    if lower in by_lower:  # the same name in other case: nothing else comes close
        return [by_lower[lower]]
    found = difflib.get_close_matches(lower, list(by_lower), n=n, cutoff=0.6)
    # Only those about as close as the best: "max_attempt" is max_attempts, not max_wait too.
    best = _ratio(lower, found[0]) if found else 0.0
    return [by_lower[f] for f in found if _ratio(lower, f) >= best - 0.1]


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def listed(names: Iterable[str]) -> str:
    """Names joined for one line, the list cut short when long."""
    names = sorted(set(names))
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def unknown_key(path: str, known: Iterable[str]) -> str:
    """``path`` names no key; ``known`` are the keys at its level (names, not paths)."""
    parent, _, last = path.rpartition(".")
    prefix = f"{parent}." if parent else ""
    known = [k for k in known if k != last]
    matches = close_matches(last, known)
    if matches:
        return f"unknown key {path}: did you mean {' or '.join(prefix + m for m in matches)}?"
    if not parent:
        return f"unknown key {path} (capflow --help lists the keys)"
    if not known:
        return f"unknown key {path}: {parent} has no keys"
    return f"unknown key {path} ({parent} has {listed(k for k in known if k[:1] != '_')})"


def unknown_option(group: str, option: str, options: Iterable[str]) -> str:
    """``group=option`` names no option that is installed; ``options`` are those that are."""
    options = sorted(set(options))
    available = f"{group} options: {listed(options)}" if options else f"no {group} options"
    plugin = EXAMPLE_PLUGINS.get((group, option))
    if plugin:
        return (f"{group}={option} comes from the example plugin: pip install -e"
                f" {_plugin_source(plugin)} ({available})")
    matches = close_matches(option, options)
    if matches:
        choices = " or ".join(f"{group}={m}" for m in matches)
        return f"unknown option {group}={option}: did you mean {choices}? ({available})"
    return f"unknown option {group}={option} ({available})"


def _plugin_source(name: str) -> str:
    """Where an example plugin's source is: the checkout's folder, when capflow runs from one
    (an editable install), so that the command works from any folder."""
    folder = Path(__file__).resolve().parents[1] / "plugins" / name
    if (folder / "pyproject.toml").is_file():
        return str(folder)
    return f"plugins/{name} (in the capflow repository)"


def hydra_error_line(exc: BaseException) -> str:
    """One line for an error Hydra raised while composing the config (it prints several)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, OverrideParseException):
        return f"cannot read {exc.override}: {_flatten(exc.message)}"
    if isinstance(exc, MissingConfigException) and exc.options is not None:
        group, _, option = (exc.missing_cfg_file or "").rpartition("/")
        if group:
            return unknown_option(group, option, exc.options)
    cause = exc.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    message = str(exc)
    if full_key and message.startswith(("Could not override", "Could not delete")):
        known = [str(k) for k in parent] if parent is not None and hasattr(parent, "keys") else []
        line = unknown_key(str(full_key), known)
        if "." in str(full_key) and not known:
            # The node is empty or a value (extra_body: null): Hydra adds keys only with +.
            line += f"; add one with +{full_key}=..."
        return line
    return _flatten(message) + (f": {_flatten(str(cause))}" if cause is not None else "")


def _flatten(message: str) -> str:
    """A message of several lines as one, without Hydra's footers (search path, docs link)."""
    kept = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith(("Config search path", "See https://", "Set the environment")):
            break
        if line and not line.startswith(("full_key:", "object_type=", "provider=")):
            kept.append(line.rstrip("."))
    return "; ".join(kept)
