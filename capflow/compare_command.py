"""``capflow compare OUTPUT ... --out DIR``: the comparison a sweep writes, over any outputs.

The same figures, sample and four files as a sweep's own (``capflow/comparison.py``): over a
sweep's outputs it writes what the sweep wrote; over separate runs it labels each output by the
config values that set it apart (from the runs' manifests).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from capflow.comparison import DEFAULT_SAMPLE, compare
from capflow.redaction import clean_message
from capflow.show import ShowError, count_arg

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130


class CompareError(Exception):
    """A user's mistake or an unreadable file: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake told in one line like every other mistake."""

    def error(self, message: str) -> NoReturn:
        raise CompareError(f"{message} (capflow compare --help says how)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="capflow compare",
        usage="capflow compare OUTPUT [OUTPUT ...] --out DIR [--sample N] [--root FOLDER]",
        description="Compare capflow outputs (a sweep's jobs, or separate runs): their figures"
                    " (rows done and failed, caption length, tokens, cost, time) and each one's"
                    " answers to the same sample of rows. Writes comparison.json, .md, .html"
                    " and .png into --out; each output is labelled by its swept values, else"
                    " by the config values that differ between the runs.",
    )
    p.add_argument("outputs", metavar="OUTPUT", nargs="*",
                   help="an output file (.jsonl, .json, .csv or .tsv), its run manifest beside it")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="the folder to write the comparison into (made if missing)")
    p.add_argument("--sample", metavar="N", type=count_arg, default=DEFAULT_SAMPLE,
                   help=f"rows shown side by side, the same in every output (default"
                        f" {DEFAULT_SAMPLE})")
    p.add_argument("--root", metavar="FOLDER",
                   help="folder that relative image paths are relative to (default: each run's"
                        " input's folder from its manifest, else the output's folder)")
    return p


def main(argv: list[str]) -> int:
    """``capflow compare ...``; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
        return _compare(args)
    except (CompareError, ShowError) as exc:
        print(f"capflow compare: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _compare(args: argparse.Namespace) -> int:
    if not args.outputs:
        raise CompareError("give at least one output to compare")
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise CompareError(f"--out {folder} is a file: give a folder")
    comparison = compare([Path(o) for o in args.outputs], sample=args.sample, root=args.root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        comparison.write(folder)
    except OSError as exc:
        raise CompareError(f"cannot write into {folder}: "
                           f"{clean_message(exc.strerror or exc, 200)}") from None
    print(f"comparison of {len(comparison.jobs)} jobs: {folder / 'comparison.html'}"
          " (and .json, .md, .png)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
