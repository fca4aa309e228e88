"""What the fake OpenAI server says an image is: its size and mean colour.

The description is deterministic, so a test can compute the caption it expects from the image
it sent (:func:`describe_image`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from urllib.parse import unquote_to_bytes

from PIL import Image, ImageStat

_INLINE_DECODE_LIMIT = 64 * 1024  # bigger images are decoded off the event loop
# Benchmarks often resend the same few images; decoding dominates the server's CPU time.
_DESCRIPTIONS: dict[bytes, str] = {}
_DESCRIPTIONS_MAX = 4096


def describe_image(data: bytes) -> str:
    """Return ``"{W}x{H} #rrggbb"``: size and mean RGB colour of an image.

    Each channel mean is rounded with :func:`round` (exact halves go to even).

    Raises ``ValueError("Invalid image")`` if Pillow cannot decode ``data``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            mean = ImageStat.Stat(img.convert("RGB")).mean
    except Exception as exc:  # Pillow raises many unrelated types on bad input
        raise ValueError("Invalid image") from exc
    r, g, b = (round(c) for c in mean)
    return f"{width}x{height} #{r:02x}{g:02x}{b:02x}"


async def describe_url(url: str) -> str:
    """Describe an ``image_url``: a ``data:`` URL's image, or an http(s) URL as ``url <url>``
    (the server fetches nothing). Raises ValueError (binascii.Error included) if invalid."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise ValueError("Invalid image")
        is_b64 = header.endswith(";base64")
        return await _describe_data(base64.b64decode(payload) if is_b64
                                    else unquote_to_bytes(payload))
    if url.startswith(("http://", "https://")):
        return f"url {url}"
    raise ValueError("Invalid image")


async def _describe_data(data: bytes) -> str:
    """:func:`describe_image`, remembered by content so a resent image is decoded once."""
    key = hashlib.blake2b(data, digest_size=16).digest()
    if (text := _DESCRIPTIONS.get(key)) is None:
        if len(data) > _INLINE_DECODE_LIMIT:
            # Pillow releases the GIL while decoding, so big images decode in parallel.
            text = await asyncio.to_thread(describe_image, data)
        else:
            text = describe_image(data)
        if len(_DESCRIPTIONS) >= _DESCRIPTIONS_MAX:
            _DESCRIPTIONS.clear()
        _DESCRIPTIONS[key] = text
    return text
