"""Images: resolve each reference in a row, check it, and prepare it to the model's budget.

A missing, truncated or non-image file, a path outside the image root, or an absurdly large
image fails its row here, before any request is spent. Large photos are downscaled (JPEGs are
decoded at a reduced DCT scale when that is enough, which costs a fraction of a full decode),
turned upright from their EXIF orientation and re-encoded; images already within the budget
and in a format every API accepts are sent as they are.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from capflow.errors import ConfigError, RowError
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
    :param fetch_timeout: seconds one download may take.
    :param fetch_max_bytes: largest download accepted.
    :param max_source_pixels: refuse images larger than this (decompression bombs).
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

    def describe(self) -> dict[str, Any]:
        """Settings that change what is sent (part of the journal's fingerprint)."""
        return {k: str(v) for k, v in vars(self).items()}

    def prepare(self, ref: object, base_dir: Path) -> PreparedImage:
        """Check and prepare one image; raises ``RowError`` when it cannot be used."""
        if not isinstance(ref, str) or not ref.strip():
            raise RowError("BadImageReference", f"image reference must be a path or URL: {ref!r}")
        if ref.startswith(("http://", "https://")):
            if not self.fetch_urls:
                return PreparedImage(url=ref, size=0)
            return self._from_bytes(self._fetch(ref), ref)
        if ref.startswith("data:"):
            return self._from_bytes(_decode_data_uri(ref), "data URI")
        scheme = _SCHEME.match(ref)
        if scheme and len(scheme.group(1)) > 1:  # one letter is a Windows drive
            raise RowError("UnsupportedScheme", f"unsupported image URL scheme: {ref[:60]}")
        return self._from_bytes(self._read(ref, base_dir), ref)

    def _read(self, ref: str, base_dir: Path) -> bytes:
        # Plain string paths: this runs once per image, and pathlib costs more than the read.
        root = str(self.image_root) if self.image_root else _real_folder(str(base_dir))
        # Absolute refs stay as given; normpath folds "..", so the last part is a real name.
        path = os.path.normpath(os.path.join(str(base_dir), os.path.expanduser(ref)))
        folder, name = os.path.split(path)
        # The folder's real path is cached; the file itself costs one lstat, and a symlink is
        # followed to its target, so a link out of the root is refused too.
        resolved = os.path.join(_real_folder(folder), name)
        if os.path.islink(resolved):
            resolved = os.path.realpath(resolved)
        if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
            raise RowError(
                "ImageOutsideRoot",
                f"image path {ref} resolves to {resolved}, outside the image root {root}"
                " (set image.image_root to allow it)",
            )
        try:
            with open(resolved, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise RowError("ImageNotFound", f"image file not found: {path}") from None
        except IsADirectoryError:
            raise RowError("ImageUnreadable", f"image path is a folder: {path}") from None
        except OSError as exc:
            raise RowError("ImageUnreadable", f"cannot read image {path}: {exc.strerror}") from None
        except ValueError as exc:  # e.g. a NUL byte in the path
            raise RowError("BadImageReference", f"bad image path {ref!r}: {exc}") from None

    def _fetch(self, url: str) -> bytes:
        import http.client
        import urllib.request  # only runs that download images pay for it

        try:
            with urllib.request.urlopen(url, timeout=self.fetch_timeout) as response:
                data = response.read(self.fetch_max_bytes + 1)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise RowError("ImageFetchFailed", f"cannot download {url}: {exc}") from None
        if len(data) > self.fetch_max_bytes:
            limit = self.fetch_max_bytes
            raise RowError("ImageTooLarge", f"{url} is larger than image.fetch_max_bytes={limit}")
        return data

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        scale = 1.0
        if self.max_side:
            scale = min(scale, self.max_side / max(width, height))
        if self.max_pixels:
            scale = min(scale, math.sqrt(self.max_pixels / (width * height)))
        return max(1, int(width * scale)), max(1, int(height * scale))

    def _from_bytes(self, data: bytes, where: str) -> PreparedImage:
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

    def _prepare_open(self, img: Image.Image, data: bytes, where: str) -> PreparedImage:
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
            return _prepared(data, accepted, width, height, len(data))
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
                return _prepared(out, "image/jpeg", w, h, len(data))
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
            ) -> PreparedImage:
    buf = io.BytesIO()
    options: dict[str, Any] = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    img.save(buf, pil_format, **options)
    return _prepared(buf.getvalue(), mime, img.width, img.height, source)


def _prepared(data: bytes, mime: str, width: int, height: int, source: int) -> PreparedImage:
    encoded = base64.b64encode(data).decode("ascii")
    return PreparedImage(f"data:{mime};base64,{encoded}", len(data), width, height, source)


def estimate_image_tokens(width: int | None, height: int | None, detail: str | None) -> int:
    """Input tokens one image costs, by OpenAI's published rule: 85 at ``low`` detail;
    otherwise the image is fitted within 2048x2048, its short side brought down to 768, and
    each 512-pixel tile costs 170 more. Images of unknown size count as 1024x1024."""
    if detail == "low":
        return 85
    w, h = (width or 1024), (height or 1024)
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise RowError("BadImageReference", f"data URI is not base64 image data: {uri[:40]}...")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise RowError("BadImageReference", f"data URI has invalid base64: {uri[:40]}...") from None
