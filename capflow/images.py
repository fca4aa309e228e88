"""Images: resolve each reference in a row, check it, and prepare it to the model's budget.

A missing, truncated or non-image file, a path outside the image root, anything that is not
a regular file (a FIFO, a device, a socket: refused before a read could block on it), a file
larger than ``image.max_file_bytes`` or an absurdly large image fails its row here, before any
request is spent. Large photos are downscaled (JPEGs are decoded at a reduced DCT scale when
that is enough, which costs a fraction of a full decode), turned upright from their EXIF
orientation and re-encoded; images already within the budget and in a format every API
accepts are sent as they are. With a cache (``image.cache``), a local file is prepared once for
all the jobs of a sweep and all later runs; its checks still run every time.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from capflow.errors import ConfigError, RowError
from capflow.image_cache import EncodedImage, PreparedImageCache, image_key
from capflow.jpeg_shrink import JpegError, shrink_jpeg

# What every OpenAI-compatible vision API accepts as it is.
_ACCEPTED = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_ENCODERS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png"),
             "webp": ("WEBP", "image/webp")}
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's filters are antialiased when they shrink: bilinear (a triangle filter) is sharp
# enough for a model's eyes at about half the cost of lanczos. "auto" is bilinear, except for
# large JPEGs, which take the fast path in capflow.jpeg_shrink.
_RESAMPLE = {
    "auto": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
# How an image file is opened. O_NONBLOCK: should a FIFO take the file's place after the
# lstat, opening it cannot wait for a writer (fstat then refuses it). O_NOFOLLOW: nor can a
# symlink out of the root that took its place be followed. O_NOCTTY: a terminal is never
# made the process's own.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))
# Settings that decide only whether a file may be read, checked before the cache is asked: the
# same file prepared under other values of these comes out the same.
_CHECKS_ONLY = ("image_root", "fetch_urls", "fetch_timeout", "fetch_max_bytes", "max_file_bytes")
# Part of every cache key: raise it when preparation changes what it makes of a file.
_PREPARATION_VERSION = 1
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(slots=True)
class PreparedImage:
    """An image ready to send: ``url`` is a ``data:`` URI or an http(s) URL passed through.

    :param size: bytes of image data sent (0 for a URL passed through).
    :param source_size: bytes of the original image (0 when unknown).
    """

    url: str
    size: int
    width: int | None = None
    height: int | None = None
    source_size: int = 0


class ImagePreparer:
    """Turns the image references of a row into ``PreparedImage`` objects.

    References are paths (relative to the dataset file, or absolute), http(s) URLs or
    ``data:`` URIs.

    :param prepare: downscale, orient and re-encode images; False sends files as they are
        (still checked).
    :param max_side: longest side in pixels after preparation (None: no bound).
    :param max_pixels: most pixels after preparation (None: no bound).
    :param format: output format for re-encoded images: ``jpeg``, ``png`` or ``webp``.
    :param quality: JPEG/WebP quality.
    :param resample: the downscaling filter: ``auto`` (the fast path of
        ``capflow.jpeg_shrink`` for JPEGs, else bilinear), ``bilinear``, ``hamming``,
        ``bicubic`` or ``lanczos``.
    :param keep_png: PNG sources stay PNG (for line art, text and transparency).
    :param image_root: folder that image paths must stay inside (None: the dataset's folder).
    :param fetch_urls: download http(s) images and prepare them like files, instead of passing
        the URL to the API.
    :param fetch_timeout: seconds one download may take in all (looking up the host,
        connecting, the headers and the body), however slowly the server sends.
    :param fetch_max_bytes: largest download accepted.
    :param max_source_pixels: refuse images larger than this (decompression bombs).
    :param max_file_bytes: largest image file (and ``data:`` URI, decoded) accepted, decided
        before it is read (None: no bound).
    :param cache: keep prepared local files in the cache at ``cache_path``, so that the jobs of
        a sweep (and later runs) prepare each file once. Only the decoding, resizing and
        encoding are saved: every check above still runs on each use. URLs and ``data:`` URIs
        are not cached. A cache that cannot be used logs a warning and is done without.
    :param cache_path: the cache's SQLite file (None: no cache).
    :param cache_max_bytes: the cache's size bound; the least recently used images go first.

    The cache settings change nothing that is sent, so ``describe()`` leaves them out.
    """

    def __init__(
        self,
        prepare: bool = True,
        max_side: int | None = 1536,
        max_pixels: int | None = 1_200_000,
        format: str = "jpeg",
        quality: int = 80,
        resample: str = "auto",
        keep_png: bool = False,
        image_root: str | None = None,
        fetch_urls: bool = False,
        fetch_timeout: float = 10.0,
        fetch_max_bytes: int = 20_000_000,
        max_source_pixels: int = 64_000_000,
        max_file_bytes: int | None = 64_000_000,
        cache: bool = True,
        cache_path: str | None = None,
        cache_max_bytes: int = 2_000_000_000,
    ) -> None:
        if format not in _ENCODERS:
            raise ConfigError(f"image.format must be one of {sorted(_ENCODERS)}, not {format!r}")
        self.prepare_images = bool(prepare)
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.format = format
        self.quality = int(quality)
        if resample not in _RESAMPLE:
            raise ConfigError(
                f"image.resample must be one of {sorted(_RESAMPLE)}, not {resample!r}"
            )
        self.resample = resample
        self.keep_png = bool(keep_png)
        self.image_root = Path(image_root).expanduser().resolve() if image_root else None
        self.fetch_urls = bool(fetch_urls)
        self.fetch_timeout = float(fetch_timeout)
        self.fetch_max_bytes = int(fetch_max_bytes)
        self.max_source_pixels = int(max_source_pixels)
        if max_file_bytes is not None and int(max_file_bytes) < 0:
            raise ConfigError(f"image.max_file_bytes must be >= 0 or null, not {max_file_bytes}")
        self.max_file_bytes = None if max_file_bytes is None else int(max_file_bytes)
        if int(cache_max_bytes) <= 0:
            raise ConfigError(f"image.cache_max_bytes must be > 0, not {cache_max_bytes}")
        # Private attributes stay out of describe(): switching the cache on or off, or moving
        # it, must not make a resumed run start over.
        self._cache = (PreparedImageCache(str(cache_path), int(cache_max_bytes))
                       if cache and cache_path else None)
        settings = {k: v for k, v in self.describe().items() if k not in _CHECKS_ONLY}
        self._cache_settings = json.dumps([_PREPARATION_VERSION, settings], sort_keys=True)

    def make_no_cache(self) -> None:
        """Use the cache only if its file exists already (a dry run leaves nothing behind)."""
        if self._cache is not None and not self._cache.path.exists():
            self._cache = None

    @property
    def image_cache(self) -> PreparedImageCache | None:
        """The prepared-image cache (None when there is none)."""
        return self._cache

    def describe(self) -> dict[str, Any]:
        """Settings that change what is sent (part of the journal's fingerprint)."""
        return {k: str(v) for k, v in vars(self).items() if not k.startswith("_")}

    def prepare(self, ref: object, base_dir: Path) -> PreparedImage:
        """Check and prepare one image; raises ``RowError`` when it cannot be used.

        ``ref`` is a path (relative to ``base_dir``), an http(s) URL, a ``data:`` URI, or an
        image as Hugging Face ``datasets`` exports it: ``{"bytes": ..., "path": ...}``, whose
        bytes (a ``data:`` URI or base64 text) are used when set, else its path."""
        if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
            ref = _embedded_image(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise RowError("BadImageReference", f"image reference must be a path or URL: {ref!r}")
        if ref.startswith(("http://", "https://")):
            if not self.fetch_urls:
                return PreparedImage(url=ref, size=0)
            return _prepared(self._from_bytes(self._fetch(ref), ref))
        if ref.startswith("data:"):
            data = _decode_data_uri(ref, self.max_file_bytes)
            return _prepared(self._from_bytes(data, "data URI"))
        scheme = _SCHEME.match(ref)
        if scheme and len(scheme.group(1)) > 1:  # one letter is a Windows drive
            raise RowError("UnsupportedScheme", f"unsupported image URL scheme: {ref[:60]}")
        return self._from_file(ref, base_dir)

    def _from_file(self, ref: str, base_dir: Path) -> PreparedImage:
        """Check, then prepare (or find in the cache) the image file ``ref``."""
        # Plain string paths and os calls: this runs once per image, and pathlib or a Python
        # file object (an ioctl, two more fstats, an lseek, a read to find the end) costs more
        # than the read. A file costs one lstat, one open, one fstat and one read (a cached
        # one no read, unless it is sent as it is).
        root = str(self.image_root) if self.image_root else _real_folder(str(base_dir))
        # Absolute refs stay as given; normpath folds "..", so the last part is a real name.
        path = os.path.normpath(os.path.join(str(base_dir), os.path.expanduser(ref)))
        folder, name = os.path.split(path)
        # The folder's real path is cached; the lstat tells a symlink, which is followed to its
        # target (one stat more), so a link out of the root is refused too.
        resolved = os.path.join(_real_folder(folder), name)
        info: os.stat_result | Exception
        try:
            info = os.lstat(resolved)
            if stat.S_ISLNK(info.st_mode):
                resolved = os.path.realpath(resolved)
                info = os.stat(resolved)
        except (OSError, ValueError) as exc:  # reported once the path is known to be allowed
            info = exc
        if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
            raise RowError(
                "ImageOutsideRoot",
                f"image path {ref} resolves to {resolved}, outside the image root {root}"
                " (set image.image_root to allow it)",
            )
        if isinstance(info, Exception):
            raise _read_error(info, ref, path) from None
        # What lstat said is refused before the file is opened: opening a device can do
        # things (a tape rewinds); the fstat below is what counts, should the file change.
        self._check_file(info, path)
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except (OSError, ValueError) as exc:
            raise _read_error(exc, ref, path) from None
        cache, key, hit = self._cache, b"", None
        try:
            info = os.fstat(fd)
            size = self._check_file(info, path)  # what counts: checked before any cache hit
            if cache is not None:
                key = image_key(resolved, info, self._cache_settings)
                hit = cache.get(key)
                if hit is not None and not hit.as_is:
                    return _prepared(hit)
            data = _read_fd(fd, size, self.max_file_bytes, path)
        except OSError as exc:
            raise _read_error(exc, ref, path) from None
        finally:
            os.close(fd)
        if hit is not None and len(data) == hit.source_size:  # sent as it is: already decoded
            return _prepared(hit._replace(data=data))
        image = self._from_bytes(data, ref)
        if cache is not None:
            cache.put(key, image)
        return _prepared(image)

    def _check_file(self, info: os.stat_result, path: str) -> int:
        """The size of a regular file within ``max_file_bytes``; anything else is refused."""
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            kind = next((kind for test, kind in _FILE_KINDS if test(mode)), "not a file")
            raise RowError("ImageUnreadable", f"image path is not a regular file ({kind}): {path}")
        limit = self.max_file_bytes
        if limit is not None and info.st_size > limit:
            raise RowError(
                "ImageTooLarge",
                f"image file is {info.st_size} bytes, more than image.max_file_bytes={limit}:"
                f" {path}",
            )
        return info.st_size

    def _fetch(self, url: str) -> bytes:
        from capflow.fetch import FetchError, fetch  # only runs that download images pay for it

        try:
            return fetch(url, self.fetch_timeout, self.fetch_max_bytes)
        except FetchError as exc:
            if exc.kind == "too_large":
                limit = self.fetch_max_bytes
                detail = f" ({exc})" if str(exc) else ""
                raise RowError(
                    "ImageTooLarge", f"{url} is larger than image.fetch_max_bytes={limit}{detail}"
                ) from None
            if exc.kind == "timeout":
                raise RowError(
                    "ImageFetchFailed",
                    f"cannot download {url}: {exc} (image.fetch_timeout={self.fetch_timeout:g})",
                ) from None
            raise RowError("ImageFetchFailed", f"cannot download {url}: {exc}") from None

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        scale = 1.0
        if self.max_side:
            scale = min(scale, self.max_side / max(width, height))
        if self.max_pixels:
            scale = min(scale, math.sqrt(self.max_pixels / (width * height)))
        return max(1, int(width * scale)), max(1, int(height * scale))

    def _from_bytes(self, data: bytes, where: str) -> EncodedImage:
        if not data:
            raise RowError("ImageUnreadable", f"image file is empty: {where}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                return self._prepare_open(img, data, where)
        except UnidentifiedImageError:
            raise RowError("ImageUnreadable", f"not an image file: {where}") from None
        except Image.DecompressionBombError:
            raise RowError("ImageTooLarge", f"image is a decompression bomb: {where}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise RowError("ImageUnreadable", f"broken image {where}: {exc}") from None

    def _prepare_open(self, img: Image.Image, data: bytes, where: str) -> EncodedImage:
        width, height = img.size
        if width * height > self.max_source_pixels:
            raise RowError(
                "ImageTooLarge",
                f"image is {width}x{height}, more than image.max_source_pixels="
                f"{self.max_source_pixels}: {where}",
            )
        source_format = img.format or ""
        orientation = img.getexif().get(_ORIENTATION, 1) if self.prepare_images else 1
        target = self._target_size(width, height) if self.prepare_images else (width, height)
        accepted = _ACCEPTED.get(source_format)
        if accepted and target == (width, height) and orientation == 1:
            img.load()  # a full decode: catches truncated and corrupt files
            return EncodedImage(data, accepted, width, height, len(data), as_is=True)
        if not self.prepare_images:
            img.load()
            return _encode(_web_mode(img, "PNG"), "PNG", "image/png", 0, len(data))
        if (self.resample == "auto" and self.format == "jpeg" and source_format == "JPEG"
                and img.mode in ("RGB", "L") and target != (width, height)):
            try:
                out = shrink_jpeg(data, target, orientation, self.quality, img.mode == "L")
            except JpegError:
                pass  # refused by its strict decode: Pillow's, which only refuses what is cut
                # short or unreadable, decides below
            else:
                w, h = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
                return EncodedImage(out, "image/jpeg", w, h, len(data))
        if source_format == "JPEG" and target[0] * 2 <= width:
            img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, target)
        img.load()
        frame = img.resize(target, _RESAMPLE[self.resample], reducing_gap=3.0)
        if orientation in _TRANSPOSE:
            frame = frame.transpose(_TRANSPOSE[orientation])
        pil_format, mime = _ENCODERS[self.format]
        if self.keep_png and source_format == "PNG":
            pil_format, mime = "PNG", "image/png"
        return _encode(_web_mode(frame, pil_format), pil_format, mime, self.quality, len(data))


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def _read_fd(fd: int, size: int, limit: int | None, path: str) -> bytes:
    """The bytes of the regular file open as ``fd``, whose fstat said ``size``: one read when
    it still has that size. A file that grew meanwhile is read on, to ``limit``."""
    if size == 0:
        # Empty, or a kernel's pseudo-file (/proc, /sys) whose size says nothing: not read.
        raise RowError("ImageUnreadable", f"image file is empty: {path}")
    want = size + 1  # one byte more than expected: a short read says the end was reached
    data = os.read(fd, want)
    if len(data) == size:
        return data
    chunks = [data]
    got = len(data)
    while data:
        if limit is not None and got > limit:
            raise RowError("ImageTooLarge", f"image file grew past image.max_file_bytes={limit}"
                                            f" while being read: {path}")
        data = os.read(fd, max(want - got, 1 << 20))
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _read_error(exc: Exception, ref: str, path: str) -> RowError:
    """The row error for an image file that could not be opened or read."""
    if isinstance(exc, ValueError):  # e.g. a NUL byte in the path
        return RowError("BadImageReference", f"bad image path {ref!r}: {exc}")
    if isinstance(exc, FileNotFoundError):
        return RowError("ImageNotFound", f"image file not found: {path}")
    assert isinstance(exc, OSError)
    return RowError("ImageUnreadable", f"cannot read image {path}: {exc.strerror or exc}")


def _web_mode(img: Image.Image, pil_format: str) -> Image.Image:
    """``img`` in a mode ``pil_format`` can store: 8 bits per channel, alpha only where the
    format keeps it (elsewhere flattened onto white)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1
    if img.mode == "RGBA" and pil_format == "JPEG":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        img = background
    return img


def _encode(img: Image.Image, pil_format: str, mime: str, quality: int, source: int
            ) -> EncodedImage:
    buf = io.BytesIO()
    options: dict[str, Any] = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    img.save(buf, pil_format, **options)
    return EncodedImage(buf.getvalue(), mime, img.width, img.height, source)


def _prepared(image: EncodedImage) -> PreparedImage:
    encoded = base64.b64encode(image.data).decode("ascii")
    return PreparedImage(f"data:{image.mime};base64,{encoded}", len(image.data), image.width,
                         image.height, image.source_size)


def estimate_image_tokens(width: int | None, height: int | None, detail: str | None) -> int:
    """Input tokens one image costs, by OpenAI's published rule: 85 at ``low`` detail;
    otherwise the image is fitted within 2048x2048, its short side brought down to 768, and
    each 512-pixel tile costs 170 more. Images of unknown size count as 1024x1024."""
    if detail == "low":
        return 85
    w, h = float(width or 1024), float(height or 1024)
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def _embedded_image(image: dict[str, Any]) -> object:
    """The reference a ``{"bytes", "path"}`` image stands for: its bytes as a ``data:`` URI,
    else its path (None when it has neither, refused by the caller)."""
    data = image.get("bytes")
    if isinstance(data, str) and data:
        return data if data.startswith("data:") else f"data:application/octet-stream;base64,{data}"
    return image.get("path")


def _decode_data_uri(uri: str, limit: int | None) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise RowError("BadImageReference", f"data URI is not base64 image data: {uri[:40]}...")
    # Decided before decoding: every 4 base64 characters make 3 bytes, less the padding.
    size = len(payload) // 4 * 3 - (payload.endswith("=") + payload.endswith("=="))
    if limit is not None and size > limit:
        raise RowError("ImageTooLarge", f"data URI holds {size} bytes, more than"
                                        f" image.max_file_bytes={limit}: {uri[:40]}...")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise RowError("BadImageReference", f"data URI has invalid base64: {uri[:40]}...") from None
