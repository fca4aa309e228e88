"""Images inside rows as ``data:`` URIs, and back to file bytes.

A sample's image lives inside a tar, where capflow cannot open it by path, so each row carries
its image as ``data:image/jpeg;base64,...``, which capflow's image preparer reads like a file
(within ``image.max_file_bytes``). Writing a tar decodes it back into the member's bytes. The
file extension follows the media type (``jpg``, ``png``, ``webp``); a member whose extension
is not its type's usual one (``.jpeg``) is noted in the URI as an ``ext`` parameter, which
RFC 2397 allows and every reader ignores, so that it is written back under the same name.
"""

from __future__ import annotations

import base64
import binascii

_MEDIA_TYPES = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
    "gif": "image/gif", "bmp": "image/bmp", "tif": "image/tiff", "tiff": "image/tiff",
}
# The usual extension of each media type: the one a data URI without ``ext`` is written as.
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp",
               "image/gif": "gif", "image/bmp": "bmp", "image/tiff": "tif"}


def media_type(ext: str) -> str:
    """The media type of an image file extension (``jpg`` -> ``image/jpeg``)."""
    ext = ext.lower()
    return _MEDIA_TYPES.get(ext, f"image/{ext}")


def to_data_uri(data: bytes, ext: str) -> str:
    """``data`` as a base64 ``data:`` URI of the type its extension ``ext`` says."""
    mime = media_type(ext)
    note = "" if _EXTENSIONS.get(mime) == ext else f";ext={ext}"
    return f"data:{mime}{note};base64,{base64.b64encode(data).decode('ascii')}"


def data_uri_ext(value: object) -> str | None:
    """The file extension of the image in a base64 ``data:`` URI, from its header alone; None
    when ``value`` is not such a URI (a path, a URL, a list)."""
    if not isinstance(value, str) or not value.startswith("data:"):
        return None
    header, sep, _ = value[:200].partition(",")
    params = header[5:].split(";")
    if not sep or params[-1] != "base64":
        return None
    noted = next((p[4:] for p in params[1:-1] if p.startswith("ext=")), "")
    mime = params[0].lower()
    ext = noted or _EXTENSIONS.get(mime) or mime.rpartition("/")[2]
    return ext if ext.isalnum() else "bin"


def from_data_uri(value: object) -> tuple[bytes, str] | None:
    """The bytes and file extension of a base64 image ``data:`` URI; None for anything else
    (a path, a URL, a list, a URI that does not decode)."""
    ext = data_uri_ext(value)
    if ext is None:
        return None
    assert isinstance(value, str)
    try:
        return base64.b64decode(value.partition(",")[2], validate=True), ext
    except (binascii.Error, ValueError):
        return None
