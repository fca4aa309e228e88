"""Which formats FileStorage reads and writes, told from a path: its extension, or a folder.

A path whose format capflow does not know is refused before anything is read or sent: guessing
(a CSV file read as JSON Lines, say) turns every row into an error after the run has started.
"""

from __future__ import annotations

import os
from pathlib import Path

from capflow.errors import ConfigError

FOLDER = "folder"  # a folder of images
SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
TABULAR = ("csv", "tsv")

# What to do about formats people try that capflow itself does not read or write.
_PARQUET = "Parquet comes from a plugin package (storage=parquet, once installed)"
_SHEETS = (".xlsx", ".xls", ".ods")
_INPUT_HINTS = {
    ".parquet": _PARQUET,
    **{suffix: "save the sheet as .csv" for suffix in _SHEETS},
    ".ndjson": "it is JSON Lines: name it .jsonl",
    ".txt": "list image paths in a .csv with an 'image' column, or give the folder of images",
}
_OUTPUT_HINTS = {
    ".parquet": _PARQUET,
    **{suffix: "write .csv, which spreadsheets open" for suffix in _SHEETS},
    ".ndjson": "write .jsonl, the same format",
}


def input_format(path: str) -> str:
    """``json``, ``jsonl``, ``csv``, ``tsv`` or ``folder`` for an input that exists.

    :raises ConfigError: capflow cannot read files named like ``path``.
    """
    if os.path.isdir(path):
        return FOLDER
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot read input {path}: {_what_is_wrong(path)}; capflow reads"
                          f" .json, .jsonl, .csv and .tsv files and folders of images"
                          f"{_hint(path, _INPUT_HINTS)}")
    return fmt


def output_format(path: str) -> str:
    """``json``, ``jsonl``, ``csv`` or ``tsv`` for an output path.

    :raises ConfigError: capflow cannot write files named like ``path``.
    """
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot write output {path}: {_what_is_wrong(path)}; capflow writes"
                          f" .json, .jsonl, .csv and .tsv files{_hint(path, _OUTPUT_HINTS)}")
    return fmt


def _what_is_wrong(path: str) -> str:
    suffix = Path(path).suffix
    return f"unknown format {suffix}" if suffix else "no extension to tell its format"


def _hint(path: str, hints: dict[str, str]) -> str:
    hint = hints.get(Path(path).suffix.lower())
    return f"; {hint}" if hint else ""


def looks_like(line: str) -> str:
    """What a file whose first line is ``line`` seems to be, with the fix, for an error
    message about a file that is not in the format its name says."""
    text = line.strip()
    if text.startswith("["):
        return "a JSON array of rows: name it .json"
    if text.startswith("{"):
        return ("JSON spread over several lines: JSON Lines has one whole object per line"
                " (a JSON array of rows goes in a .json file)")
    if "\t" in text:
        return "tab-separated values: name it .tsv"
    if "," in text:
        return "comma-separated values: name it .csv"
    if text.startswith("<"):
        return "HTML or XML"
    return "plain text"
