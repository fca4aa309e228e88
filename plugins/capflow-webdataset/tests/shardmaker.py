"""Small WebDataset shards for the tests, laid out the way img2dataset writes them.

Each sample is ``KEY.<image>``, ``KEY.json`` and ``KEY.txt``, the members of a sample
together; beside each ``NNNNNN.tar`` is the ``NNNNNN_stats.json`` img2dataset leaves.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(size: tuple[int, int], colour: tuple[int, int, int], ext: str) -> bytes:
    """A plain image of ``size`` and ``colour``, encoded as ``ext`` says."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, _FORMATS[ext])
    return out.getvalue()


@dataclass
class Sample:
    """One sample: its image member (``ext`` and bytes, or none), metadata and caption."""

    shard: str
    key: str
    ext: str | None
    image: bytes | None
    metadata: dict
    text: str

    def members(self) -> list[tuple[str, bytes]]:
        out = [(f"{self.key}.{self.ext}", self.image)] if self.image is not None else []
        out.append((f"{self.key}.json", json.dumps(self.metadata).encode()))
        out.append((f"{self.key}.txt", self.text.encode()))
        return out


def sample(shard: str, key: str, ext: str | None, image: bytes | None) -> Sample:
    """A sample with img2dataset's metadata: its key, url, original caption and status."""
    caption = f"original caption of {key}"
    metadata = {"key": key, "url": f"https://example.com/{key}.{ext}", "caption": caption,
                "status": "success"}
    return Sample(shard, key, ext, image, metadata, caption)


def write_shard(path: Path, samples: list[Sample]) -> None:
    """One tar shard holding ``samples``, members in order, and its stats file."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for name, data in s.members():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0}
    path.with_name(path.name.replace(".tar", "_stats.json")).write_text(json.dumps(stats))


def make_shards(folder: Path) -> dict[str, Sample]:
    """Two shards in ``folder`` (made if missing): five good samples of distinct sizes and
    colours (jpg, png, webp, jpeg), one whose image is not an image, one without an image.
    Returns the samples by key."""
    folder.mkdir(parents=True, exist_ok=True)
    first = [
        sample("000000.tar", "000000000", "jpg", image_bytes((32, 24), (200, 10, 10), "jpg")),
        sample("000000.tar", "000000001", "png", image_bytes((40, 30), (10, 200, 10), "png")),
        sample("000000.tar", "000000002", "webp", image_bytes((20, 40), (10, 10, 200), "webp")),
    ]
    second = [
        sample("000001.tar", "000010000", "jpeg", image_bytes((24, 24), (120, 120, 0), "jpeg")),
        sample("000001.tar", "000010001", "jpg", b"\xff\xd8 this is no JPEG"),
        sample("000001.tar", "000010002", None, None),
        sample("000001.tar", "000010003", "png", image_bytes((48, 16), (0, 90, 90), "png")),
    ]
    for shard in (first, second):
        write_shard(folder / shard[0].shard, shard)
    return {s.key: s for s in first + second}


def read_tar(path: Path) -> dict[str, bytes]:
    """The members of a tar file by name, in order."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
