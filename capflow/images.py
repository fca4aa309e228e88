"""Images: resolve each reference in a row, check it, and turn it into what the API receives.

A missing, truncated or non-image file fails its row here, before any request is spent.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from capflow.errors import RowError

# Formats every OpenAI-compatible vision API accepts as they are.
_PASS_THROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(slots=True)
class PreparedImage:
    """An image ready to send: ``url`` is a ``data:`` URI or an http(s) URL passed through."""

    url: str
    size: int
    width: int | None = None
    height: int | None = None


class ImagePreparer:
    """Turns the image references of a row into ``PreparedImage`` objects.

    References are paths (relative to the dataset file, or absolute), http(s) URLs (passed
    through to the API) or ``data:`` URIs.
    """

    def prepare(self, ref: object, base_dir: Path) -> PreparedImage:
        """Check and encode one image; raises ``RowError`` when it cannot be used."""
        if not isinstance(ref, str) or not ref.strip():
            raise RowError("BadImageReference", f"image reference must be a path or URL: {ref!r}")
        if ref.startswith(("http://", "https://")):
            return PreparedImage(url=ref, size=0)
        if ref.startswith("data:"):
            return self._from_bytes(_decode_data_uri(ref), "data URI")
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RowError("ImageNotFound", f"image file not found: {path}") from None
        except IsADirectoryError:
            raise RowError("ImageUnreadable", f"image path is a folder: {path}") from None
        except OSError as exc:
            raise RowError("ImageUnreadable", f"cannot read image {path}: {exc.strerror}") from None
        return self._from_bytes(data, str(path))

    def _from_bytes(self, data: bytes, where: str) -> PreparedImage:
        if not data:
            raise RowError("ImageUnreadable", f"image file is empty: {where}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                img.load()  # a full decode: catches truncated and corrupt files
                width, height = img.size
                mime = _PASS_THROUGH.get(fmt)
                if mime is None:
                    # The API cannot take this format as it is: send it as PNG.
                    buf = io.BytesIO()
                    img.save(buf, "PNG")
                    data, mime = buf.getvalue(), "image/png"
        except UnidentifiedImageError:
            raise RowError("ImageUnreadable", f"not an image file: {where}") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RowError("ImageUnreadable", f"broken image {where}: {exc}") from None
        encoded = base64.b64encode(data).decode("ascii")
        return PreparedImage(f"data:{mime};base64,{encoded}", len(data), width, height)


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
