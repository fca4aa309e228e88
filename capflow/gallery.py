"""The page ``capflow show --html`` writes: each row's images as thumbnails beside its caption.

One self-contained HTML file: thumbnails are small JPEGs embedded as ``data:`` URIs, the style
is inline, there is no script, and a Content-Security-Policy forbids the page to load anything,
so it opens the same from a mail attachment, a file share or offline. Remote (http/https)
images are linked, never fetched. Thumbnails are made in a thread pool (Pillow releases the
interpreter lock while it decodes, scales and encodes) while rows are written in file order.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import itertools
import os
import re
import stat
import tempfile
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from capflow.redaction import clean_message
from capflow.show import Entry, Failure, describe_ref

THUMB_SIDE = 256  # longest side of a thumbnail, in pixels
THUMB_QUALITY = 75
MAX_IMAGES_PER_ROW = 4  # more are counted, not shown: a row of 50 images would swamp the page
MAX_FILE_BYTES = 64_000_000  # as image.max_file_bytes: larger files are not read
MAX_PIXELS = 64_000_000  # as image.max_source_pixels: a run refuses larger images too
_ROWS_AHEAD_PER_THREAD = 4  # rows whose thumbnails may be in the making at once, per thread

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; margin: 0 0 .4em; }
pre.counts { background: #fff; border: 1px solid #ddd; padding: .6em .8em; white-space: pre-wrap; }
table.failures { border-collapse: collapse; margin: .6em 0; }
table.failures td, table.failures th { border: 1px solid #ddd; padding: .2em .6em;
  text-align: left; vertical-align: top; background: #fff; }
p.note { color: #555; }
section.row { display: flex; gap: 1em; align-items: flex-start; background: #fff;
  border: 1px solid #ddd; border-left: 6px solid #4a8; margin: .8em 0; padding: .6em; }
section.row.failed { border-left-color: #c33; background: #fff5f5; }
section.row.plain { border-left-color: #bbb; }
div.images { display: flex; flex-wrap: wrap; gap: .5em; flex: 0 0 auto; max-width: 540px; }
figure { margin: 0; max-width: 260px; }
figure img { display: block; max-width: 256px; max-height: 256px; border: 1px solid #ccc; }
figcaption { font-size: .8em; color: #666; overflow-wrap: anywhere; }
div.missing { width: 240px; min-height: 60px; padding: 8px; border: 2px dashed #c33;
  color: #922; font-size: .85em; overflow-wrap: anywhere; }
div.missing.remote, div.missing.none { border-color: #aaa; color: #555; }
div.text { flex: 1 1 auto; min-width: 0; }
h2 { font-size: 1em; margin: 0 0 .3em; color: #555; }
h2 span.id { font-weight: normal; margin-left: .4em; }
p.caption { white-space: pre-wrap; margin: 0; overflow-wrap: anywhere; }
p.error { margin: 0; color: #922; overflow-wrap: anywhere; }
p.error strong { background: #c33; color: #fff; padding: 0 .35em; border-radius: 3px; }
"""


@dataclass(frozen=True)
class Header:
    """What the page says above the rows.

    :param lines: the counts as ``capflow show`` prints them.
    :param failures: (error type, its failures) for the table of failures.
    :param note: where relative image paths are read from.
    :param shown: the gallery's limit of rows.
    :param left_out: rows of the file past it.
    """

    title: str
    lines: list[str]
    failures: list[tuple[str, Failure]]
    note: str
    shown: int
    left_out: int


@dataclass
class GalleryStats:
    """What the page shows: rows, embedded thumbnails, images not found or unreadable."""

    rows: int = 0
    images: int = 0
    missing: int = 0


@dataclass(frozen=True)
class Thumb:
    """One image of a row as the page shows it: a thumbnail, a link, or why neither."""

    ref: str
    uri: str | None = None  # data:image/jpeg;base64,...
    size: tuple[int, int] = (0, 0)
    link: str | None = None  # an http(s) image, not fetched
    problem: str | None = None


# -- thumbnails ----------------------------------------------------------------------------


def make_thumb(ref: object, root: Path) -> Thumb:
    """The thumbnail of image reference ``ref`` (a path relative to ``root``, an absolute path,
    a ``data:`` URI or an http(s) URL). Never raises: a problem becomes the placeholder's text."""
    shown = describe_ref(ref)
    if not isinstance(ref, str) or not ref.strip():
        return Thumb(shown, problem="not an image reference")
    if ref.startswith(("http://", "https://")):
        return Thumb(shown, link=ref)
    try:
        if ref.startswith("data:"):
            data = _data_uri_bytes(ref)
        elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", ref):  # one letter: a Windows drive
            return Thumb(shown, problem="unsupported image reference")
        else:
            data = _read_file(root / os.path.expanduser(ref))
        uri, size = _jpeg_thumbnail(data)
    except _NoImage as exc:
        return Thumb(shown, problem=str(exc))
    return Thumb(shown, uri=uri, size=size)


class _NoImage(Exception):
    """Why a reference gives no thumbnail (the placeholder's text)."""


def _read_file(path: Path) -> bytes:
    """The bytes of a regular file. What is not one (a FIFO, a device, a folder) is refused
    before it is opened, where opening could block or have effects, and again after."""
    name = clean_message(path, 300)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _NoImage(f"not a regular file: {name}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise _NoImage(f"image not found: {name}") from None
    except (OSError, ValueError) as exc:
        raise _NoImage(f"cannot read {name}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _NoImage(f"not a regular file: {name}")
        if info.st_size > MAX_FILE_BYTES:
            raise _NoImage(f"image file too large ({info.st_size} bytes): {name}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _NoImage(f"cannot read {name}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _data_uri_bytes(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise _NoImage("data URI without base64 image data")
    if len(payload) // 4 * 3 > MAX_FILE_BYTES:
        raise _NoImage("data URI too large")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise _NoImage("data URI with invalid base64") from None


def _jpeg_thumbnail(data: bytes) -> tuple[str, tuple[int, int]]:
    """A JPEG of at most ``THUMB_SIDE`` px a side, upright from its EXIF orientation, as a
    ``data:`` URI, with its size."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise _NoImage(f"image too large for a thumbnail ({width}x{height})")
            if img.format == "JPEG":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale: a 24 MP photo in a few ms.
                img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
            upright = ImageOps.exif_transpose(img) or img
            upright.thumbnail((THUMB_SIDE, THUMB_SIDE))
            rgb = _on_white(upright)
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=THUMB_QUALITY)
    except _NoImage:
        raise
    except UnidentifiedImageError:
        raise _NoImage("not an image") from None
    except Image.DecompressionBombError:
        raise _NoImage("image too large to decode (a decompression bomb?)") from None
    except Exception as exc:  # Pillow raises many unrelated types on broken files
        raise _NoImage(f"broken image: {clean_message(exc, 200)}") from None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode(), rgb.size


def _on_white(img: Image.Image) -> Image.Image:
    """``img`` in RGB, transparency laid on white (JPEG has no alpha)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img if img.mode == "RGB" else img.convert("RGB")


# -- the page ------------------------------------------------------------------------------


def write_gallery(path: Path, entries: Iterable[Entry], header: Header, root: Path,
                  limit: int, workers: int | None = None) -> GalleryStats:
    """Write the page for the first ``limit`` of ``entries`` to ``path``, atomically (a reader
    never sees half a page, and a failure leaves the old page in place)."""
    # Big photos would each print Pillow's bomb warning; the page says what was refused.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    workers = workers or (os.cpu_count() or 2) + 1
    stats = GalleryStats()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out, ThreadPoolExecutor(workers) as pool:
            out.write(_head(header))
            for entry, thumbs in _thumbnailed(entries, root, limit, pool, workers):
                out.write(_row(entry, thumbs, stats))
            out.write(_tail(header))
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes it private; a page is for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return stats


def _thumbnailed(entries: Iterable[Entry], root: Path, limit: int, pool: ThreadPoolExecutor,
                 workers: int) -> Iterator[tuple[Entry, list[Thumb]]]:
    """Each of the first ``limit`` entries with its thumbnails, in order, while the pool makes
    those of the next few rows (a bounded number, so memory stays flat)."""
    ahead: deque[tuple[Entry, list[Future[Thumb]]]] = deque()
    for entry in itertools.islice(entries, limit):
        refs = entry.images[:MAX_IMAGES_PER_ROW]
        ahead.append((entry, [pool.submit(make_thumb, ref, root) for ref in refs]))
        if len(ahead) >= workers * _ROWS_AHEAD_PER_THREAD:
            first, futures = ahead.popleft()
            yield first, [f.result() for f in futures]
    while ahead:
        first, futures = ahead.popleft()
        yield first, [f.result() for f in futures]


def _head(header: Header) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        # Nothing may be fetched: images are data: URIs, style is inline, there is no script.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none';"
        " img-src data:; style-src 'unsafe-inline'\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<title>{e(header.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>{e(header.title)}</h1>\n",
        f"<pre class=\"counts\">{e(chr(10).join(header.lines))}</pre>\n",
    ]
    if header.failures:
        parts.append("<table class=\"failures\">\n<tr><th>error type</th><th>rows</th>"
                     "<th>example</th></tr>\n")
        for kind, failure in header.failures:
            parts.append(f"<tr><td>{e(kind)}</td><td>{failure.count}</td><td><a href=\"#row-"
                         f"{failure.index}\">row {failure.index}</a>: {e(failure.message)}"
                         "</td></tr>\n")
        parts.append("</table>\n")
    parts.append(f"<p class=\"note\">{e(header.note)}</p>\n")
    if header.left_out:
        parts.append(f"<p class=\"note left-out\">{_left_out(header)}</p>\n")
    parts.append("<main>\n")
    return "".join(parts)


def _left_out(header: Header) -> str:
    return (f"This page shows the first {header.shown:,} rows; {header.left_out:,} more are left"
            " out (capflow show --html FILE --limit N shows N rows, --limit 0 all).")


def _tail(header: Header) -> str:
    end = ""
    if header.left_out:
        end = f"<p class=\"note left-out\">{_left_out(header)}</p>\n"
    return f"</main>\n{end}</body>\n</html>\n"


def _row(entry: Entry, thumbs: list[Thumb], stats: GalleryStats) -> str:
    e = html.escape
    stats.rows += 1
    kind = "failed" if entry.error else ("captioned" if entry.caption is not None else "plain")
    figures = []
    for n, thumb in enumerate(thumbs, 1):
        ref = f"<figcaption>{e(thumb.ref)}</figcaption>"
        if thumb.uri:
            stats.images += 1
            w, h = thumb.size
            figures.append(f"<figure><img src=\"{thumb.uri}\" width=\"{w}\" height=\"{h}\""
                           f" alt=\"row {entry.index}, image {n}\">{ref}</figure>")
        elif thumb.link:
            figures.append(f"<figure><div class=\"missing remote\"><a href=\"{e(thumb.link)}\""
                           f" rel=\"noreferrer\">remote image (not fetched)</a></div>{ref}"
                           "</figure>")
        else:
            stats.missing += 1
            figures.append(f"<figure><div class=\"missing\">{e(thumb.problem or '')}</div>"
                           f"{ref}</figure>")
    more = len(entry.images) - len(thumbs)
    if more > 0:
        figures.append(f"<p class=\"note\">+{more} more images</p>")
    if not entry.images:
        figures.append("<div class=\"missing none\">no image in this row</div>")
    title = f"row {entry.index}"
    if entry.row_id is not None:
        title += f" <span class=\"id\">id {e(clean_message(entry.row_id, 100))}</span>"
    text = [f"<h2>{title}</h2>"]
    if entry.error:
        error_type, message = entry.error
        text.append(f"<p class=\"error\"><strong>{e(error_type)}</strong> {e(message)}</p>")
    if entry.caption is not None:
        # Line by line: the caption keeps its line breaks, and loses escape sequences and
        # control characters as on the terminal.
        caption = "\n".join(clean_message(line, None) for line in entry.caption.split("\n"))
        text.append(f"<p class=\"caption\">{e(caption)}</p>")
    return (f"<section class=\"row {kind}\" id=\"row-{entry.index}\">\n"
            f"<div class=\"images\">{''.join(figures)}</div>\n"
            f"<div class=\"text\">{''.join(text)}</div>\n</section>\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

