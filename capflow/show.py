"""``capflow show OUTPUT``: what a run's output holds, on the terminal and as an HTML page.

The output is read as a stream, twice at most: a first pass counts rows, captions and failures
(grouped by error type, one example each), a second picks a few captions spread over the file
and, with ``--html``, feeds the gallery (``capflow/gallery.py``). Memory does not grow with the
file: only the counts, the chosen samples and the rows whose thumbnails are being made are held.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from capflow.errors import ConfigError
from capflow.redaction import clean_message

if TYPE_CHECKING:
    from capflow.gallery import GalleryStats

# capflow.engine.ERROR_KEY, spelt out: importing the engine would add a tenth of a second to
# a command that never runs it.
ERROR_KEY = "_error"
MANIFEST_SUFFIX = ".run.json"
EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 2, 130
_CAPTION_CHARS = 200  # a sample caption on the terminal: one line, cut here
_MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few kB; anything huge is not one


class ShowError(Exception):
    """A user's mistake or an unreadable file: one line on stderr, exit status 2."""


@dataclass(frozen=True)
class Entry:
    """What ``show`` needs of one output row.

    :param index: the row's position in the file, from 0 (as capflow's summary counts rows).
    :param row_id: the row's ``id``, when it has a plain one.
    :param caption: the answer under the caption key, or None.
    :param error: ``(type, message)`` of the row's error record, or None.
    :param images: the row's image references, as written in the row.
    :param answer: the answer under the caption key as the row holds it (a string, or an
        operator's JSON value), or None.
    """

    index: int
    row_id: str | None
    caption: str | None
    error: tuple[str, str] | None
    images: tuple[object, ...]
    answer: object = None


@dataclass
class Failure:
    """Failed rows of one error type: how many, and the first as an example."""

    count: int
    index: int
    message: str


@dataclass
class Counts:
    """The first pass's figures."""

    rows: int = 0
    captioned: int = 0
    failed: int = 0
    with_image: int = 0
    failures: dict[str, Failure] = field(default_factory=dict)

    @property
    def other(self) -> int:
        """Rows with neither a caption nor an error (not yet run, or another step's key)."""
        return self.rows - self.captioned - self.failed

    def add(self, entry: Entry) -> None:
        self.rows += 1
        self.with_image += bool(entry.images)
        if entry.error is not None:
            self.failed += 1
            kind, message = entry.error
            seen = self.failures.get(kind)
            if seen is None:
                self.failures[kind] = Failure(1, entry.index, message)
            else:
                seen.count += 1
        elif entry.caption is not None:
            self.captioned += 1


# -- reading an output file ----------------------------------------------------------------


class _Unreadable(str):
    """A row whose text is not a JSON object; the string says where and why."""


def file_format(path: Path) -> str:
    """``json``, ``jsonl`` or ``csv``/``tsv``, from the extension; else from the first
    character (an array or an object per line)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("json", "jsonl", "csv", "tsv"):
        return suffix
    if suffix == "ndjson":
        return "jsonl"
    with open(path, encoding="utf-8-sig") as f:
        start = f.read(4096).lstrip()[:1]
    if start == "[":
        return "json"
    if start == "{":
        return "jsonl"
    raise ShowError(f"{path}: not a capflow output (.json, .jsonl, .csv or .tsv)")


def iter_entries(path: Path, key: str = "caption", image_key: str = "image") -> Iterator[Entry]:
    """Every row of ``path`` as an ``Entry``, read as a stream."""
    fmt = file_format(path)
    # newline="": the csv module reads line breaks inside quoted cells itself.
    with open(path, encoding="utf-8-sig", newline="" if fmt in ("csv", "tsv") else None) as f:
        for index, value in enumerate(_values(f, fmt, str(path), image_key)):
            yield _entry(index, value, key, image_key)


def _values(f: IO[str], fmt: str, name: str,
            image_key: str) -> Iterator[dict[str, Any] | _Unreadable]:
    if fmt == "json":
        from capflow.storage.json_stream import iter_json_array

        for number, (value, _) in enumerate(iter_json_array(f, name), 1):
            yield value if isinstance(value, dict) else _Unreadable(
                f"row {number} is not a JSON object")
    elif fmt == "jsonl":
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Unreadable(f"line {number} is not valid JSON ({exc.msg})")
                continue
            yield value if isinstance(value, dict) else _Unreadable(
                f"line {number} is not a JSON object")
    else:
        # Captions and data: URIs outgrow the csv module's default cell limit of 128 kB.
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))
        dialect = "excel-tab" if fmt == "tsv" else "excel"
        yield from (_from_csv(row, image_key) for row in csv.DictReader(f, dialect=dialect))


def _from_csv(row: dict[str, Any], image_key: str) -> dict[str, Any]:
    """A CSV row as the JSON row it stands for (``capflow/storage/csv_output.py`` writes
    values other than strings as JSON): empty cells are absent, and the error record and a
    list of images are decoded. Other cells stay text: a caption that looks like JSON is
    still a caption."""
    out: dict[str, Any] = {}
    for name, cell in row.items():
        if not isinstance(name, str) or not isinstance(cell, str) or cell == "":
            continue  # an empty cell, or cells beyond the header's columns
        if name == ERROR_KEY or (name == image_key and cell[:1] == "["):
            try:
                out[name] = json.loads(cell)
                continue
            except json.JSONDecodeError:
                pass
        out[name] = cell
    return out


def _entry(index: int, value: dict[str, Any] | _Unreadable, key: str, image_key: str) -> Entry:
    if isinstance(value, _Unreadable):
        return Entry(index, None, None, ("UnreadableRow", str(value)), ())
    error = _error_of(value.get(ERROR_KEY))
    caption = value.get(key)
    if caption is not None and not isinstance(caption, str):
        caption = json.dumps(caption, ensure_ascii=False)  # an operator that answers in JSON
    images = value.get(image_key)
    if isinstance(images, (str, dict)):
        images = [images]
    row_id = value.get("id")
    return Entry(
        index=index,
        row_id=str(row_id) if isinstance(row_id, (str, int, float)) else None,
        caption=caption,
        error=error,
        images=tuple(images) if isinstance(images, list) else (),
        answer=value.get(key),
    )


def _error_of(record: object) -> tuple[str, str] | None:
    if record is None or record == {}:
        return None
    if isinstance(record, dict):
        return (clean_message(record.get("type") or "Error", 60),
                clean_message(record.get("message") or "", 300))
    return "Error", clean_message(record, 300)


# -- the first pass, the samples and the manifest ------------------------------------------


def count(entries: Iterable[Entry]) -> Counts:
    counts = Counts()
    for entry in entries:
        counts.add(entry)
    return counts


class Sampler:
    """Picks ``wanted`` captioned rows spread evenly over the ``captioned`` ones: the middle
    of each of ``wanted`` equal stretches, so neither end is favoured."""

    def __init__(self, captioned: int, wanted: int) -> None:
        wanted = max(0, min(wanted, captioned))
        self._picks = {(2 * k + 1) * captioned // (2 * wanted) for k in range(wanted)}
        self._seen = 0
        self.samples: list[Entry] = []

    @property
    def done(self) -> bool:
        return len(self.samples) == len(self._picks)

    def see(self, entry: Entry) -> None:
        if entry.caption is None or entry.error is not None:
            return
        if self._seen in self._picks:
            self.samples.append(entry)
        self._seen += 1


def manifest_of(output: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The run manifest beside ``output`` (``<output>.run.json``) and, when there is one that
    cannot be used, why. Its format belongs to the run; anything unexpected is passed over."""
    path = output.with_name(output.name + MANIFEST_SUFFIX)
    try:
        if not path.is_file():
            return None, None
        if path.stat().st_size > _MAX_MANIFEST_BYTES:
            return None, f"{path.name} is too large to be a manifest"
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path.name} cannot be read: {clean_message(exc, 200)}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def manifest_lines(manifest: dict[str, Any], name: str) -> list[str]:
    """What the run manifest (``capflow/manifest.py``) says of the run: its status and its
    figures. Any part missing or of another shape is left out."""
    status = manifest.get("status")
    head = f"run ({name})"
    if isinstance(status, str):
        head += f": {clean_message(status, 40)}"
        if isinstance(manifest.get("ended"), str):
            head += f" {clean_message(manifest['ended'], 40)}"
    if isinstance(manifest.get("stopped"), str):
        head += f" ({clean_message(manifest['stopped'], 200)})"
    summary = manifest.get("summary")
    figures = _figures(summary) if isinstance(summary, dict) else []
    return [head, *_wrap(figures)] if figures or status else []


def _figures(s: dict[str, Any]) -> list[str]:
    def number(key: str) -> int | float | None:
        value = s.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value if ok else None

    out = [f"{label} {number(key):,}" for key, label in (
        ("requests", "requests"), ("retries", "retries"), ("cache_hits", "cache hits"))
        if number(key) is not None]
    prompt, completion = number("prompt_tokens"), number("completion_tokens")
    if prompt is not None and completion is not None:
        estimated = number("tokens_estimated_for")
        out.append(f"tokens {prompt:,} prompt + {completion:,} completion"
                   + (f" (estimated for {estimated:,} answers)" if estimated else ""))
    if (cost := number("cost")) is not None:
        out.append(f"cost {cost:.4f}")
    elapsed = number("elapsed_s")
    if elapsed is not None:
        out.append(f"elapsed {elapsed:.1f} s")
    return out


def image_root(output: Path, root: str | None, manifest: dict[str, Any] | None) -> tuple[Path, str]:
    """The folder that relative image paths are read from, and a note on how it was chosen:
    ``--root``, else the input named by the manifest (the folder holding it, or the input
    itself when it is a folder), else the output's own folder."""
    if root:
        return Path(root).expanduser(), "--root"
    config = manifest.get("config") if manifest else None
    given = manifest.get("input") if manifest else None
    if not isinstance(given, str) and isinstance(config, dict):
        given = config.get("input")
    if isinstance(given, str) and given:
        # A relative input is taken from here; a dataset moved since the run falls through.
        candidate = Path(given).expanduser()
        if candidate.is_dir():
            return candidate, "the manifest's input folder"
        if candidate.is_file():
            return candidate.parent, "the folder of the manifest's input"
    return output.resolve().parent, "the output's folder"


# -- the command ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capflow show",
        description="Count, sample and (with --html) show the rows of a capflow output.",
    )
    p.add_argument("output", metavar="OUTPUT", help="an output file: .jsonl, .json, .csv or .tsv")
    p.add_argument("--html", metavar="FILE", help="also write a gallery page to FILE")
    p.add_argument("--limit", metavar="N", type=count_arg, default=1000,
                   help="rows in the gallery (default 1000; 0: all)")
    p.add_argument("--samples", metavar="N", type=count_arg, default=5,
                   help="sample captions to print (default 5)")
    p.add_argument("--key", metavar="NAME", default="caption",
                   help="the output key holding the answer (default caption)")
    p.add_argument("--image-key", metavar="NAME", default="image",
                   help="the key holding each row's image or images (default image)")
    p.add_argument("--root", metavar="DIR",
                   help="folder that relative image paths are relative to (default: the"
                        " input's folder from the run manifest, else the output's folder)")
    return p


def count_arg(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def main(argv: list[str]) -> int:
    """``capflow show ...``; returns the exit status."""
    args = _parser().parse_args(argv)  # a usage mistake: argparse's two lines, exit 2
    try:
        return _show(args)
    except ShowError as exc:
        print(f"capflow show: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `capflow show out.jsonl | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    path = Path(args.output)
    check_readable(path)
    html = Path(args.html) if args.html else None
    if html is not None:
        _check_writable(html, path)
    manifest, manifest_problem = manifest_of(path)

    def entries() -> Generator[Entry, None, None]:
        return reading(path, iter_entries(path, args.key, args.image_key))

    counts = count(entries())
    lines = _counts_lines(path, counts, args.key)
    if manifest:
        lines += manifest_lines(manifest, path.name + MANIFEST_SUFFIX)
    elif manifest_problem:
        lines.append(f"run: {manifest_problem}")
    # Before the second pass, which may take a while.
    print("\n".join([*lines, *_failure_lines(counts)]), flush=True)

    sampler = Sampler(counts.captioned, args.samples)
    made = None
    with closing(_sampling(entries(), sampler)) as stream:
        if html is not None:
            made = _gallery(html, stream, lines, counts, path, args, manifest)
        if not sampler.done:
            for _ in stream:  # the samples past the gallery's last row, or all of them
                if sampler.done:
                    break
    if sampler.samples:
        print(f"samples ({len(sampler.samples)} of {counts.captioned:,} captioned rows)")
        for entry in sampler.samples:
            print(f"  {_sample_line(entry)}")
    if made is not None:
        shown = f"{_plural(made.rows, 'row')}, {_plural(made.images, 'image')}"
        if made.missing:
            shown += f", {made.missing:,} not found or unreadable"
        print(f"gallery: {html} ({shown})")
    return EXIT_OK


def _gallery(html: Path, stream: Iterator[Entry], lines: list[str], counts: Counts, path: Path,
             args: argparse.Namespace, manifest: dict[str, Any] | None) -> GalleryStats:
    from capflow.gallery import Header, write_gallery

    root, how = image_root(path, args.root, manifest)
    limit = args.limit or counts.rows
    header = Header(title=f"capflow: {path.name}", lines=lines,
                    failures=_by_count(counts),
                    note=f"Relative image paths are read from {root} ({how}).",
                    shown=limit, left_out=max(0, counts.rows - limit))
    try:
        return write_gallery(html, stream, header, root, limit)
    except OSError as exc:
        raise ShowError(f"cannot write {html}: {exc.strerror or exc}") from None


def reading(path: Path, entries: Iterator[Entry]) -> Generator[Entry, None, None]:
    """``entries``, with a file that cannot be read turned into one line."""
    try:
        yield from entries
    except UnicodeDecodeError as exc:
        raise ShowError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x});"
                        " is it a capflow output?") from None
    except ConfigError as exc:  # the JSON array reader's one-line account of a broken file
        raise ShowError(str(exc)) from None
    except OSError as exc:
        raise ShowError(f"cannot read {path}: {exc.strerror or exc}") from None


def _sampling(entries: Iterator[Entry], sampler: Sampler) -> Generator[Entry, None, None]:
    for entry in entries:
        sampler.see(entry)
        yield entry


def check_readable(path: Path) -> None:
    """Raise ``ShowError`` with one line unless ``path`` is an output file that can be read."""
    if not path.exists():
        raise ShowError(f"no such file: {path}")
    if path.is_dir():
        raise ShowError(f"{path} is a folder: give the output file (.jsonl, .json, .csv or .tsv)")
    if not os.access(path, os.R_OK):
        raise ShowError(f"cannot read {path}: permission denied")
    try:
        file_format(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ShowError(f"cannot read {path}: {reason}") from None


def _check_writable(html: Path, output: Path) -> None:
    if html.resolve() in (output.resolve(), output.resolve().with_name(
            output.name + MANIFEST_SUFFIX)):
        raise ShowError(f"--html {html} would overwrite the output or its manifest: give"
                        " another file name, e.g. gallery.html")
    if html.is_dir():
        raise ShowError(f"--html {html} is a folder: give a file name, e.g. {html}/gallery.html")
    folder = html.parent
    if not folder.is_dir():
        raise ShowError(f"--html {html}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ShowError(f"--html {html}: cannot write in {folder}")


def _counts_lines(path: Path, counts: Counts, key: str) -> list[str]:
    lines = [f"{path}: {_plural(counts.rows, 'row')}, {counts.captioned:,} captioned,"
             f" {counts.failed:,} failed"]
    if counts.other:
        lines.append(f"  {_plural(counts.other, 'row')} with neither {key!r} nor an error record")
    return lines


def _failure_lines(counts: Counts) -> list[str]:
    if not counts.failures:
        return []
    lines = ["failed by error type"]
    width = max(len(kind) for kind in counts.failures)
    for kind, failure in _by_count(counts):
        lines.append(f"  {kind:<{width}} {failure.count:>7,}   e.g. row {failure.index}:"
                     f" {failure.message}")
    return lines


def _by_count(counts: Counts) -> list[tuple[str, Failure]]:
    return sorted(counts.failures.items(), key=lambda kv: (-kv[1].count, kv[0]))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def _wrap(items: list[str], width: int = 96) -> list[str]:
    """``items`` joined with commas into indented lines of at most about ``width``."""
    lines, line = [], ""
    for item in items:
        if line and len(line) + len(item) + 2 > width:
            lines.append(f"  {line},")
            line = ""
        line = f"{line}, {item}" if line else item
    return [*lines, f"  {line}"] if line else lines


def _sample_line(entry: Entry) -> str:
    where = f"row {entry.index}"
    if entry.row_id is not None:
        where += f" (id {clean_message(entry.row_id, 60)})"
    if entry.images:
        where += f" {describe_ref(entry.images[0])}"
        if len(entry.images) > 1:
            where += f" +{len(entry.images) - 1} more"
    return f"{where}: {clean_message(entry.caption or '', _CAPTION_CHARS)}"


def describe_ref(ref: object) -> str:
    """An image reference fit for one line: data: URIs by type and size, paths cleaned."""
    if isinstance(ref, str) and ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        kind = clean_message(header[5:].split(";")[0], 40)
        return f"[{kind} data URI, {len(payload) * 3 / 4000:.1f} kB]"
    return clean_message(ref if isinstance(ref, str) else json.dumps(ref), 120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
