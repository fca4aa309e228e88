"""The fast path for large JPEGs: where it runs, what it keeps, and what it refuses."""

from __future__ import annotations

import base64
import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from capflow.errors import RowError
from capflow.images import ImagePreparer
from capflow.jpeg_shrink import JpegError, shrink_jpeg


def _textured(size: tuple[int, int]) -> Image.Image:
    """Fine stripes, shapes and noise: detail near the pixel scale, where aliasing shows."""
    w, h = size
    # Seeded noise: the same image on every run (a damaged file must fail the same way).
    noise = Image.frombytes("L", size, random.Random(w * h).randbytes(w * h)).convert("RGB")
    img = Image.blend(Image.new("RGB", size, (90, 140, 60)), noise, 0.4)
    draw = ImageDraw.Draw(img)
    for x in range(0, w, 7):
        draw.line((x, 0, x + h // 3, h), fill=(240, 230, 200), width=2)
    for i in range(12):
        draw.ellipse((i * w // 13, h // 4, i * w // 13 + w // 20, h // 2), fill=(20, 20, 120))
    return img


def _asymmetric(size: tuple[int, int]) -> Image.Image:
    """Smooth, with a different colour in each quadrant: any wrong flip or turn shows."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for box, colour in (((0, 0, w // 2, h // 2), (220, 30, 30)),
                        ((w // 2, 0, w, h // 2), (30, 200, 30)),
                        ((0, h // 2, w // 2, h), (30, 30, 220)),
                        ((w // 2, h // 2, w, h), (230, 230, 40))):
        draw.rectangle(box, fill=colour)
    draw.ellipse((w // 8, h // 8, w // 3, h // 3), fill=(250, 250, 250))
    return img


def _jpeg(img: Image.Image, path: Path | None = None, orientation: int | None = None,
          quality: int = 92) -> bytes:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    if path:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    return 10 * math.log10(255**2 / float(np.mean((x - y) ** 2)))


def _decoded(prepared) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(prepared.url.split(",", 1)[1])))


@pytest.mark.parametrize("target", [(1100, 825), (758, 568), (640, 480), (200, 150), (160, 120)])
def test_it_keeps_as_much_as_pillows_antialiased_path(tmp_path, target):
    # Against a lanczos resize of the full image, on stripes and noise where aliasing shows,
    # the fast path is no worse than Pillow's draft decode plus its bilinear filter. The
    # targets leave 1.09x and 1.19x (linear), then 1.41x, 1.5x and 1.9x (area) to shrink
    # after the DCT-scaled decode.
    full = _textured((2400, 1800))
    _jpeg(full, tmp_path / "p.jpg", quality=95)
    reference = full.resize(target, Image.Resampling.LANCZOS)
    budget = {"max_side": target[0], "max_pixels": None, "quality": 95}
    fast = _decoded(ImagePreparer(**budget).prepare("p.jpg", tmp_path))
    pillow = _decoded(ImagePreparer(resample="bilinear", **budget).prepare("p.jpg", tmp_path))
    nearest = full.resize(target, Image.Resampling.NEAREST)
    assert fast.size == pillow.size == target
    assert _psnr(fast, reference) >= _psnr(pillow, reference) - 0.5
    assert _psnr(fast, reference) > _psnr(nearest, reference) + 1.5


def test_the_default_filter_takes_the_fast_path_for_a_large_jpeg(tmp_path):
    data = _jpeg(_textured((1600, 1200)), tmp_path / "p.jpg")
    prepared = ImagePreparer(max_side=800, max_pixels=None).prepare("p.jpg", tmp_path)
    assert base64.b64decode(prepared.url.split(",", 1)[1]) == shrink_jpeg(
        data, (800, 600), 1, 80, gray=False)
    assert (prepared.width, prepared.height) == (800, 600)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_comes_out_as_pillow_turns_it(tmp_path, orientation):
    _jpeg(_asymmetric((1200, 800)), tmp_path / "p.jpg", orientation=orientation)
    budget = {"max_side": 450, "max_pixels": None, "quality": 95}
    fast = ImagePreparer(**budget).prepare("p.jpg", tmp_path)
    pillow = ImagePreparer(resample="bilinear", **budget).prepare("p.jpg", tmp_path)
    upright = (450, 300) if orientation < 5 else (300, 450)
    assert (fast.width, fast.height) == (pillow.width, pillow.height) == upright
    assert _decoded(fast).size == upright
    assert _psnr(_decoded(fast), _decoded(pillow)) > 30


def test_a_grayscale_jpeg_stays_grayscale(tmp_path):
    _jpeg(_textured((1200, 900)).convert("L"), tmp_path / "g.jpg")
    prepared = ImagePreparer(max_side=500, max_pixels=None).prepare("g.jpg", tmp_path)
    img = _decoded(prepared)
    assert (img.mode, img.size) == ("L", (500, 375))


def test_a_cmyk_jpeg_takes_pillows_path(tmp_path):
    _textured((1200, 900)).convert("CMYK").save(tmp_path / "c.jpg", "JPEG", quality=90)
    img = _decoded(ImagePreparer(max_side=500, max_pixels=None).prepare("c.jpg", tmp_path))
    assert (img.mode, img.size) == ("RGB", (500, 375))


def test_png_output_takes_pillows_path(tmp_path):
    _jpeg(_textured((1200, 900)), tmp_path / "p.jpg")
    prepared = ImagePreparer(max_side=500, max_pixels=None, format="png").prepare("p.jpg",
                                                                                tmp_path)
    assert prepared.url.startswith("data:image/png;base64,")
    assert _decoded(prepared).size == (500, 375)


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_large_jpeg_is_a_row_error(tmp_path, damage):
    data = _jpeg(_textured((1600, 1200)))
    half = len(data) // 2
    if damage == "truncated":
        data = data[:half]
    else:  # bytes overwritten in the middle of the compressed data
        data = data[:half] + bytes(range(256)) * 16 + data[half + 4096:]
    (tmp_path / "p.jpg").write_bytes(data)
    with pytest.raises(JpegError):
        shrink_jpeg(data, (800, 600), 1, 80, gray=False)
    with pytest.raises(RowError, match="broken image p.jpg") as caught:
        ImagePreparer(max_side=800, max_pixels=None).prepare("p.jpg", tmp_path)
    assert caught.value.kind == "ImageUnreadable"


def test_a_jpeg_with_a_recoverable_flaw_is_accepted_as_pillow_accepts_it(tmp_path):
    # Stray bytes before a marker: libjpeg warns and decodes. The strict fast path refuses
    # the file, and Pillow's path, which accepts it, decides.
    data = _jpeg(_textured((1600, 1200)))
    sos = data.index(b"\xff\xda")
    flawed = data[:sos] + b"\x00\x00\x00" + data[sos:]
    (tmp_path / "p.jpg").write_bytes(flawed)
    with pytest.raises(JpegError):
        shrink_jpeg(flawed, (800, 600), 1, 80, gray=False)
    prepared = ImagePreparer(max_side=800, max_pixels=None).prepare("p.jpg", tmp_path)
    assert _decoded(prepared).size == (800, 600)
