"""Finding a dataset's shards: a folder of tar files, one tar file, or a brace pattern.

img2dataset writes ``000000.tar``, ``000001.tar``, ... into one folder; WebDataset tools name
shard sets with brace patterns (``shards/{000000..000099}.tar``). Both come down to an ordered
list of files here, so that the reader and the resume identity see the same shards.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

from capflow import ConfigError

#: The file names taken as shards in a folder (tarfile reads the compressed ones too).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
# A pattern may name at most this many shards: a typo such as {0..999999999} fails at once
# instead of filling the memory.
_MAX_EXPANDED = 1_000_000


def shard_stem(name: str) -> str:
    """A shard's file name without its tar suffix: ``000000.tar`` -> ``000000``."""
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def expand_braces(pattern: str, whole: str | None = None) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{000..002}`` is a zero-padded
    numeric range (as wide as its first bound), ``{a,b}`` a list; several braces multiply.

    Raises ``ConfigError`` for a brace that is neither, or a pattern naming too many shards.
    """
    whole = whole or pattern
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    choices = _brace_choices(match.group(1), whole)
    rests = expand_braces(tail, whole)
    if len(choices) * len(rests) > _MAX_EXPANDED:
        raise ConfigError(f"input pattern {whole} names more than {_MAX_EXPANDED} shards")
    return [head + choice + rest for choice in choices for rest in rests]


def _brace_choices(body: str, whole: str) -> list[str]:
    """What one brace stands for: ``000..009`` or ``a,b,c``."""
    numbers = _RANGE.match(body)
    if numbers:
        first, last = int(numbers.group(1)), int(numbers.group(2))
        if abs(last - first) >= _MAX_EXPANDED:
            raise ConfigError(f"input pattern {whole} names more than {_MAX_EXPANDED} shards")
        width = len(numbers.group(1))
        step = 1 if last >= first else -1
        return [str(n).zfill(width) for n in range(first, last + step, step)]
    if "," in body:
        return body.split(",")
    raise ConfigError(
        f"input pattern {whole}: {{{body}}} is neither a range such as {{000000..000009}}"
        " nor a list such as {a,b}"
    )


def find_shards(path: str) -> list[Path]:
    """The shards ``path`` names, in order; ``ConfigError`` (one line) when there are none.

    - a brace pattern (``shards/{000000..000009}.tar``): every file it names, each required;
    - a folder: the tar files in it (``.tar``, ``.tar.gz``, ``.tgz``), sorted by name;
    - a file: that one file.
    """
    if "{" in path or "}" in path:
        shards = [Path(name) for name in expand_braces(path)]
        for shard in shards:
            if not shard.is_file():
                raise ConfigError(f"shard not found: {shard} (from the input pattern {path})")
        return shards
    root = Path(path)
    if root.is_dir():
        shards = sorted(
            (p for p in root.iterdir()
             if p.name.endswith(SHARD_SUFFIXES) and not p.name.startswith(".") and p.is_file()),
            key=lambda p: p.name,
        )
        if not shards:
            raise ConfigError(
                f"no tar shards in {path} (a webdataset folder holds 000000.tar, 000001.tar, ...)"
            )
        return shards
    if root.is_file():
        return [root]
    raise ConfigError(f"input not found: {path}")


def check_tar(shard: Path) -> None:
    """Raise ``ConfigError`` unless ``shard`` opens as a tar file (compressed or not)."""
    try:
        is_tar = tarfile.is_tarfile(shard)
    except OSError as exc:
        raise ConfigError(f"cannot read the shard {shard}: {exc.strerror or exc}") from None
    if not is_tar:
        raise ConfigError(f"not a tar file: {shard} (storage=webdataset reads tar shards)")


def stats_count(shard: Path) -> int | None:
    """The number of samples img2dataset says it wrote into ``shard``: the ``successes`` of the
    ``<stem>_stats.json`` beside it (None when there is none, or it does not say)."""
    stats = shard.with_name(shard_stem(shard.name) + "_stats.json")
    try:
        with open(stats, encoding="utf-8") as f:
            successes = json.load(f).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return successes if isinstance(successes, int) and successes >= 0 else None
