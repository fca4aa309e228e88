"""A small parser of the Prometheus text format, strict enough to catch a malformed textfile:
every sample belongs to a family declared by ``# HELP`` and ``# TYPE`` lines before it, names
and labels follow Prometheus' rules, values parse as Go would parse them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}
_SUFFIXES = {"summary": ("", "_sum", "_count"), "histogram": ("_bucket", "_sum", "_count")}


@dataclass
class Family:
    """One metric family: its type, help text and samples as (name, labels, value)."""

    kind: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def _value(text: str) -> float:
    if text in ("NaN", "+Inf", "-Inf"):
        return {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}[text]
    return float(text)


def _labels(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    rest = text or ""
    while rest:
        match = _LABEL.match(rest)
        assert match, f"bad labels: {text!r}"
        name, raw = match[1], match[2]
        assert name not in labels, f"label {name} twice in {text!r}"
        labels[name] = raw.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
        rest = rest[match.end():]
    return labels


def parse(text: str) -> dict[str, Family]:
    """The families of a textfile, by name; AssertionError for anything malformed."""
    assert text.endswith("\n"), "a textfile ends with a newline"
    families: dict[str, Family] = {}
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert re.fullmatch(_NAME, name), line
            assert name not in families, f"{name} declared twice"
            families[name] = Family(help=help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert name in families and not families[name].samples, f"TYPE after samples: {line}"
            assert kind in _TYPES, line
            families[name].kind = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match[1], _labels(match[2]), _value(match[3])
            family = next((f for f in families if name in
                           {f + s for s in _SUFFIXES.get(families[f].kind, ("",))}), None)
            assert family is not None, f"sample of an undeclared family: {line}"
            key = (name, tuple(sorted(labels.items())))
            assert key not in seen, f"duplicate series: {line}"
            seen.add(key)
            families[family].samples.append((name, labels, value))
    return families


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels``."""
    family = name.removesuffix("_sum").removesuffix("_count")
    family = name if name in families else family
    found = [v for n, lab, v in families[family].samples
             if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, f"{len(found)} samples {name}{labels}"
    return found[0]
