"""Test pictures made with Pillow: distinct scenes, and near-duplicates of them (the same
scene resized, re-encoded as a low-quality JPEG, brightened)."""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A blurred picture of a few coloured shapes on a coloured ground, one per ``seed``."""
    rng = random.Random(seed)
    width, height = size
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randrange(width // 6, width // 2)
        y1 = y0 + rng.randrange(height // 6, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(2))


def size_of(seed: int) -> tuple[int, int]:
    """Each scene's own size, so that the server's captions ("WxH #rrggbb") tell them apart."""
    return 320 - 12 * seed, 240 + 8 * seed


def resized(img: Image.Image) -> Image.Image:
    return img.resize((img.width // 2, img.height // 2))


def brightened(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.15)


def jpeg_bytes(img: Image.Image, quality: int = 40) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def save(img: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **options)
    return path
