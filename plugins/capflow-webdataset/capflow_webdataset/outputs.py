"""Which kind of output an ``output=`` name asks for, and whether it is one this storage
writes.

- ``out.tar``: one tar shard holding every sample;
- ``out/{shard}.tar``: several shards, one per input shard (``out/000000.tar`` from
  ``000000.tar``), or numbered ``000000``, ``000001``, ... with ``samples_per_shard`` rows
  each;
- ``out.jsonl``: JSON Lines, each image replaced by a reference into its input shard.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from capflow import ConfigError
from capflow_webdataset.shards import shard_stem

#: The placeholder of a sharded output's name.
SHARD_FIELD = "{shard}"


class OutputKind(Enum):
    """What an output name asks for."""

    TAR = "tar"
    TAR_SHARDS = "tar shards"
    JSONL = "jsonl"
    OTHER = "other"


def output_kind(name: str) -> OutputKind:
    """The kind of output ``name`` asks for, by its extension and placeholder."""
    lower = name.lower()
    if lower.endswith(".tar"):
        return OutputKind.TAR_SHARDS if SHARD_FIELD in name else OutputKind.TAR
    if lower.endswith(".jsonl"):
        return OutputKind.JSONL
    return OutputKind.OTHER


def check_output(name: str, samples_per_shard: int | None, shards: Sequence[Path]) -> None:
    """Raise ``ConfigError`` (one line) unless ``name`` is an output this storage writes, with
    ``samples_per_shard`` and the input ``shards`` it is given."""
    kind = output_kind(name)
    if kind is OutputKind.OTHER:
        raise ConfigError(
            f"storage=webdataset writes .tar, .jsonl or 'out/{SHARD_FIELD}.tar' outputs, not"
            f" {name}"
        )
    folder, file_name = os.path.split(name)
    if any(brace in folder + file_name.replace(SHARD_FIELD, "") for brace in "{}"):
        raise ConfigError(
            f"output {name}: the only placeholder is {SHARD_FIELD}, in the file name"
            f" (output='out/{SHARD_FIELD}.tar')"
        )
    if samples_per_shard and kind is not OutputKind.TAR_SHARDS:
        raise ConfigError(
            f"storage.samples_per_shard={samples_per_shard} needs an output name with"
            f" {SHARD_FIELD}, such as output='out/{SHARD_FIELD}.tar' (not {name})"
        )
    if kind is OutputKind.TAR_SHARDS and not samples_per_shard:
        seen: dict[str, Path] = {}
        for shard in shards:
            stem = shard_stem(shard.name)
            if stem in seen:
                raise ConfigError(
                    f"input shards {seen[stem]} and {shard} have the same name, so"
                    f" {name} cannot be named after them: set storage.samples_per_shard"
                )
            seen[stem] = shard


def shard_output(name: str, stem: str) -> Path:
    """The file of output shard ``stem`` of the sharded output ``name``."""
    return Path(name.replace(SHARD_FIELD, stem))


def journal_name(name: str) -> Path:
    """Where the run journal of output ``name`` goes: beside it, as capflow puts it, with
    the placeholder of a sharded output spelled out (``out/shards.tar.journal.sqlite``)."""
    return Path(name.replace(SHARD_FIELD, "shards") + ".journal.sqlite")
