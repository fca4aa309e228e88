"""DedupStep: a pipeline step that drops near-duplicate images before they are captioned.

Each row's image is read (in the preparation threads, many at once) and given a perceptual
hash; then, in input order, a row whose hash is within ``max_distance`` bits of a row kept
before it is dropped, its ``_dropped`` record naming that row's image. Only kept rows are
compared with: of a group of copies, the first is kept and captioned, the others dropped.

Images are read through capflow's ``ImagePreparer`` (the run's ``image`` settings): the same
checks as the caption step (the image root, file kinds and sizes, downloads), the same
``data:`` URIs and URLs, and the same prepared-image cache, so the caption step that follows
finds the kept images prepared already. A row whose image cannot be read or hashed fails
alone, with a one-line error, and is not captioned.
"""

from __future__ import annotations

import base64
import json
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from capflow.errors import ConfigError, RowError
from capflow.operators.map_step import MapStep
from capflow_dedup import hashing
from capflow_dedup.index import HammingIndex

if TYPE_CHECKING:
    from capflow.engine import EngineSettings
    from capflow.images import ImagePreparer
    from capflow.run import RunSummary
    from capflow.storage.base import Storage

SHOWN = 80  # characters of an image reference shown in a reason (data: URIs are long)


class Kept(NamedTuple):
    """What the index keeps of a kept row: its hashes and how a reason names it."""

    codes: tuple[int, ...]
    image: str
    row_id: Any


class Match(NamedTuple):
    """The kept row a dropped row duplicates, and how far apart their hashes are."""

    distance: int
    kept: Kept


class DedupStep(MapStep):
    """Drops each row whose image is a near-duplicate of an earlier kept row's.

    :param input_image_key: the row key holding the image reference (a path, relative to the
        dataset, a ``data:`` URI or a URL) or a list of them. Rows without one are kept.
    :param hash: the perceptual hash: ``phash`` (DCT; the most robust to re-encoding and
        brightness), ``dhash`` (gradients), ``ahash`` (mean) or ``whash`` (wavelets).
    :param hash_size: the hash is ``hash_size**2`` bits (8: 64 bits).
    :param max_distance: the most bits two hashes may differ by and be duplicates (6 suits
        64-bit hashes; scale it with the bits). A row of several images is a duplicate of an
        earlier row of as many images when each image is within ``max_distance`` of the one
        in the same place.
    :param output_hash_key: the field each row's hash is written to (hex, as imagehash writes
        it; a list when the row's images are a list); None: not written.
    :param image_io: reads and checks the images (None: capflow's defaults, without cache).
    :param dropped_output: where dropped rows go (.jsonl). None: beside the step's output as
        ``<output>.dropped.jsonl``; in a pipeline with steps after this one, beside the
        pipeline's final output as ``<final output>.<step name>.dropped.jsonl``, rather than
        among the intermediate step files.
    """

    def __init__(
        self,
        input_image_key: str = "image",
        hash: str = "phash",  # the option's name in the config: pipeline.steps.dedup.hash
        hash_size: int = 8,
        max_distance: int = 6,
        output_hash_key: str | None = "phash",
        image_io: ImagePreparer | None = None,
        dropped_output: str | None = None,
    ) -> None:
        super().__init__(dropped_output=dropped_output)
        if not input_image_key:
            raise ConfigError("DedupStep needs input_image_key: the row key of its images")
        self.input_image_key = str(input_image_key)
        self.hash = str(hash)
        self.hash_size = int(hash_size)
        self.bits = hashing.check_settings(self.hash, self.hash_size)
        self.max_distance = int(max_distance)
        if not 0 <= self.max_distance < self.bits // 2:
            raise ConfigError(
                f"DedupStep max_distance must be >= 0 and < {self.bits // 2} (half of the"
                f" {self.bits} bits, where unrelated images already meet), not {max_distance}")
        self.output_hash_key = str(output_hash_key) if output_hash_key else None
        if self.output_hash_key == self.input_image_key:
            raise ConfigError(f"DedupStep output_hash_key={self.output_hash_key} would replace"
                              " the images it hashes: choose another key (or null)")
        if image_io is None:
            from capflow.images import ImagePreparer

            image_io = ImagePreparer()
        self.image_io = image_io
        self._hash_bytes = hashing.hasher(self.hash, self.hash_size)
        self._reset()

    def describe(self) -> dict[str, Any]:
        return {"operator": type(self).__name__, "input_image_key": self.input_image_key,
                "hash": self.hash, "hash_size": self.hash_size,
                "max_distance": self.max_distance, "output_hash_key": self.output_hash_key}

    # -- the run --------------------------------------------------------------------------

    def run(self, storage: Storage, *, dry_run: bool = False,
            settings: EngineSettings | None = None, **keys: Any) -> RunSummary:
        """Dedup every row of ``storage`` (see ``MapStep.run``), comparing with this run's
        kept rows only."""
        self._reset()
        try:
            return super().run(storage, dry_run=dry_run, settings=settings, **keys)
        finally:
            self._reset()

    def _reset(self) -> None:
        self._indexes: dict[int, HammingIndex[Kept]] = {}  # by the number of images
        self._hashed: dict[str, list[Any]] = {}  # image references -> [codes, rows waiting]
        self._lock = threading.Lock()
        self._last: tuple[str, Match] | None = None

    # -- in the preparation threads -------------------------------------------------------

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:  # type: ignore[override]
        """The row's hash field (nothing for a row without images); hashes kept for
        ``admit``, which sees this row next, in input order."""
        value = row.get(self.input_image_key)
        refs = _refs(value)
        if not refs:
            return {}
        codes = tuple(self._hash(ref) for ref in refs)
        with self._lock:
            entry = self._hashed.setdefault(_refs_key(refs), [codes, 0])
            entry[1] += 1
        if self.output_hash_key is None:
            return {}
        hexes = [hashing.to_hex(code, self.bits) for code in codes]
        return {self.output_hash_key: hexes if isinstance(value, list) else hexes[0]}

    def _hash(self, ref: Any) -> int:
        """The hash of the image ``ref``; a ``RowError`` when it cannot be read or hashed."""
        prepared = self.image_io.prepare(ref, self.base_dir)  # capflow's checks and errors
        header, _, payload = prepared.url.partition(",")
        if not header.startswith("data:"):
            raise RowError(
                "BadImage",
                f"cannot hash {_shown(ref)}: URLs are passed to the API unread; set"
                " image.fetch_urls=true to download and check them")
        return self._hash_bytes(base64.b64decode(payload), _shown(ref))

    # -- in input order ---------------------------------------------------------------------

    def admit(self, row: dict[str, Any]) -> str | None:
        """Why ``row`` is dropped (the kept row it duplicates), or None to keep it."""
        refs = _refs(row.get(self.input_image_key))
        if not refs:
            return None
        codes = self._take(refs)
        if codes is None:
            return None
        index = self._indexes.get(len(codes))
        if index is None:
            index = self._indexes[len(codes)] = HammingIndex(self.bits, self.max_distance)
        match = self._match(index, codes)
        if match is None:
            index.add(codes[0], Kept(codes, _shown(refs[0], len(refs)), row.get("id")))
            return None
        kept = match.kept
        named = kept.image
        if kept.row_id is not None and kept.row_id != kept.image:
            named = f"row id={json.dumps(kept.row_id, default=str)} ({kept.image})"
        reason = (f"near-duplicate of {named}: {self.hash} distance {match.distance}"
                  f" <= max_distance {self.max_distance}")
        self._last = (reason, match)
        return reason

    def dropped_record(self, reason: str) -> dict[str, Any]:
        """The ``_dropped`` record: the reason, and the kept row's image, id and distance."""
        record = super().dropped_record(reason)
        if self._last is not None and self._last[0] == reason:
            match = self._last[1]
            record["duplicate_of"] = match.kept.image
            if match.kept.row_id is not None:
                record["duplicate_of_id"] = match.kept.row_id
            record["distance"] = match.distance
        self._last = None
        return record

    def _take(self, refs: list[Any]) -> tuple[int, ...] | None:
        """The hashes ``apply`` computed for ``refs``, computed again should they be gone
        (None if that fails: the row is then kept, unexamined, rather than the run stopped)."""
        key = _refs_key(refs)
        with self._lock:
            entry = self._hashed.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._hashed[key]
                return entry[0]
        try:
            return tuple(self._hash(ref) for ref in refs)
        except RowError:
            return None

    def _match(self, index: HammingIndex[Kept], codes: tuple[int, ...]) -> Match | None:
        """The nearest kept row within ``max_distance`` in every image, or None."""
        if len(codes) == 1:
            found = index.nearest(codes[0])
            return None if found is None else Match(*found)
        best: Match | None = None
        for _, kept in index.within(codes[0]):
            distance = max((a ^ b).bit_count() for a, b in zip(codes, kept.codes, strict=True))
            if distance <= self.max_distance and (best is None or distance < best.distance):
                best = Match(distance, kept)
        return best


def _refs(value: Any) -> list[Any]:
    """A row's image references as a list (empty when it has none)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _refs_key(refs: list[Any]) -> str:
    return json.dumps(refs, sort_keys=True, default=str)


def _shown(ref: Any, count: int = 1) -> str:
    """An image reference as a reason shows it: at most ``SHOWN`` characters."""
    text = ref if isinstance(ref, str) else json.dumps(ref, default=str)
    if len(text) > SHOWN:
        text = text[:SHOWN - 3] + "..."
    return text if count == 1 else f"{text} (+{count - 1} more)"
