"""Perceptual hashes of images, as ints: near-duplicates (the same picture resized, re-encoded,
retouched) get hashes a few bits apart, different pictures about half their bits apart.

The hashes are imagehash's (``phash``, ``dhash``, ``ahash``, ``whash``), of ``hash_size**2``
bits, read as one int (the bits in imagehash's order, so that ``to_hex`` gives imagehash's own
hex string and ``imagehash.hex_to_hash`` reads it back). imagehash and numpy are imported on
first use: capflow loads every plugin each time it starts, and most commands hash nothing.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from capflow.errors import ConfigError, RowError

if TYPE_CHECKING:
    from PIL import Image

METHODS = ("phash", "dhash", "ahash", "whash")
_FUNCTIONS = {"phash": "phash", "dhash": "dhash", "ahash": "average_hash", "whash": "whash"}


def check_settings(method: str, hash_size: int) -> int:
    """The number of bits of ``method`` hashes of ``hash_size``; a ``ConfigError`` for values
    imagehash cannot use."""
    if method not in METHODS:
        raise ConfigError(f"DedupStep hash must be one of {', '.join(METHODS)}, not {method!r}")
    if hash_size < 2:
        raise ConfigError(f"DedupStep hash_size must be >= 2, not {hash_size}")
    if method == "whash" and hash_size & (hash_size - 1):
        raise ConfigError(f"DedupStep hash_size must be a power of 2 for whash, not {hash_size}")
    return hash_size * hash_size


def hasher(method: str, hash_size: int) -> Callable[[bytes, str], int]:
    """``hash(data, where)``: the ``method`` hash of the encoded image ``data`` as an int;
    raises ``RowError("BadImage", ...)``, naming ``where``, for data it cannot hash."""
    import imagehash

    function = getattr(imagehash, _FUNCTIONS[method])
    # JPEGs are decoded at a reduced scale (1/2 to 1/8) that still leaves the hash functions
    # at least twice the pixels they sample (phash reads hash_size*4 pixels a side).
    draft = (hash_size * 8, hash_size * 8)

    def hash_image(data: bytes, where: str) -> int:
        from PIL import Image, ImageOps

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("L", draft)
                gray = _gray(ImageOps.exif_transpose(img))
            return int(str(function(gray, hash_size=hash_size)), 16)
        except Image.DecompressionBombError:
            raise RowError("BadImage", f"image is a decompression bomb: {where}") from None
        except Exception as exc:  # Pillow and imagehash raise many unrelated types
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RowError("BadImage", f"cannot hash image {where}: {detail}") from None

    return hash_image


def to_hex(code: int, bits: int) -> str:
    """``code`` as imagehash writes a hash of ``bits`` bits: zero-padded lowercase hex."""
    return f"{code:0{(bits + 3) // 4}x}"


def _gray(img: Image.Image) -> Image.Image:
    """``img`` in grey levels, transparency flattened onto white (as a JPEG of it is sent),
    so that a PNG with alpha and its JPEG copy hash alike."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat.convert("L")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return img.convert("I").point(_eight_bits).convert("L")
    return img.convert("L")


def _eight_bits(value: Any) -> Any:
    return value * (1 / 256)
