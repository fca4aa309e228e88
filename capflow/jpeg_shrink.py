"""The fast path for large JPEGs: decode at a reduced DCT scale, shrink the rest, re-encode.

Most of the images in a photo dataset are JPEGs far above the budget, and preparing them is
the work that bounds a run on a small machine. libjpeg-turbo (through simplejpeg) decodes
straight to the smallest of its scales, 1/8 to 8/8, that still covers the target: its DCT
scaling does most of the shrink while decoding, and filters out the detail the smaller image
cannot hold. What remains is under 2x (at most 1.5x from 1/4 scale up), unless the target is
below 1/8 scale. OpenCV finishes it with area averaging, an antialiasing filter that keeps as
much as Pillow's bilinear one, or, up to 1.2x, where the two measure the same, with linear
interpolation, five times cheaper (``tests/test_jpeg_shrink.py`` holds this path to Pillow's
on fine stripes and noise). The pixels never pass through Pillow, which would copy them
twice, and the whole path runs without the GIL.

Decoding is strict: libjpeg's warnings (corrupt data, a file cut short) are errors here, and
the caller then hands the file to Pillow, whose decoder refuses only what it cannot read.
"""

from __future__ import annotations

from typing import Any

# The largest shrink left to linear interpolation after the DCT-scaled decode: beyond it,
# stripes near the pixel scale alias (1.4x: 4 dB further from a lanczos resize than area).
LINEAR_MAX_FACTOR = 1.2


class JpegError(ValueError):
    """The JPEG data cannot be decoded (truncated or corrupt)."""


def shrink_jpeg(data: bytes, size: tuple[int, int], orientation: int, quality: int,
                gray: bool) -> bytes:
    """A JPEG of ``data`` shrunk to ``size`` (given before ``orientation`` is applied), turned
    upright from its EXIF ``orientation``, encoded at ``quality``, with no metadata."""
    import cv2  # only runs that shrink JPEGs pay for these imports
    import simplejpeg  # type: ignore[import-untyped]  # ships neither stubs nor py.typed

    width, height = size
    try:
        pixels = simplejpeg.decode_jpeg(data, "GRAY" if gray else "BGR", strict=True,
                                        min_width=width, min_height=height)
    except ValueError as exc:
        raise JpegError(str(exc)) from None
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    factor = max(pixels.shape[1] / width, pixels.shape[0] / height)
    if factor > 1:
        interpolation = cv2.INTER_LINEAR if factor <= LINEAR_MAX_FACTOR else cv2.INTER_AREA
        pixels = cv2.resize(pixels, size, interpolation=interpolation)
    pixels = _upright(cv2, pixels, orientation)
    ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise JpegError("cannot encode the shrunk image")
    return encoded.tobytes()


def _upright(cv2: Any, pixels: Any, orientation: int) -> Any:
    """``pixels`` transformed as EXIF ``orientation`` says it must be to view it."""
    if orientation == 2:
        return cv2.flip(pixels, 1)
    if orientation == 3:
        return cv2.rotate(pixels, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(pixels, 0)
    if orientation == 5:
        return cv2.transpose(pixels)
    if orientation == 6:
        return cv2.rotate(pixels, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(pixels), -1)
    if orientation == 8:
        return cv2.rotate(pixels, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return pixels
