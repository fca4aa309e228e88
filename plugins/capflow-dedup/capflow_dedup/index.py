"""HammingIndex: the stored hashes within a Hamming distance of a query, found without
comparing the query with every one of them.

Comparing each row's hash with every kept row's is O(n^2) over a dataset: 100,000 photos make
billions of comparisons. The index uses multi-index hashing (Norouzi, Punjani and Fleet,
"Fast search in Hamming space with multi-index hashing", 2012): each ``bits``-bit hash is cut
into ``m`` disjoint bands, and each band has a dict from the band's value to the hashes that
have it. Two hashes within distance ``r = s*m + a`` (``0 <= a < m``) differ by at most ``s``
bits in one of the first ``a + 1`` bands, or by at most ``s - 1`` in one of the others:
otherwise they would differ by at least ``(a+1)(s+1) + (m-a-1)s = r + 1`` bits (the
pigeonhole principle). A query therefore looks up, in each band, its own value and the values
within that band's radius (a fixed list of bit masks, computed once), and compares only the
hashes found there in full. With 64-bit hashes and ``r = 6``, four 16-bit bands make 52
dict look-ups and a handful of full comparisons per query, whatever the number of hashes.

While few hashes are stored, or when the radius is so wide that the masks would outnumber
any dataset, a plain scan is cheaper and is used instead; both give the same answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import combinations
from typing import Generic, TypeVar

T = TypeVar("T")

BAND_BITS = 16  # bits per band: 2**16 buckets keep them small for datasets of up to ~10^6 rows
MAX_PROBES = 50_000  # more look-ups than this per query: a plain scan, always


class HammingIndex(Generic[T]):
    """Hashes (``bits``-bit ints), each with an item, searchable by Hamming distance.

    :param bits: the hashes' length in bits.
    :param max_distance: the search radius: ``within`` finds the hashes at most this many
        bits away.
    :param bands: how many bands to cut the hashes into (None: one per 16 bits, at most
        ``max_distance + 1``, beyond which more bands find nothing sooner).
    """

    def __init__(self, bits: int, max_distance: int, bands: int | None = None) -> None:
        if bits < 1:
            raise ValueError(f"bits must be >= 1, not {bits}")
        if max_distance < 0:
            raise ValueError(f"max_distance must be >= 0, not {max_distance}")
        self.bits = bits
        self.max_distance = max_distance
        if bands is None:
            bands = min(max_distance + 1, max(1, round(bits / BAND_BITS)))
        self.bands = max(1, min(int(bands), bits))
        self.compared = 0  # full comparisons made so far: what the index saves
        self._codes: list[int] = []
        self._items: list[T] = []
        self._layout = _bands(bits, self.bands)
        bands_radii = [(width, radius) for (_, width), radius
                       in zip(self._layout, _radii(max_distance, self.bands), strict=True)]
        # Look-ups per query through the bands; below that many hashes, a scan is cheaper.
        self._probes = sum(_ball_size(width, radius) for width, radius in bands_radii)
        self._masks: list[list[int]] | None = None
        self._tables: list[dict[int, list[int]]] = []
        if self._probes <= MAX_PROBES:
            self._masks = [list(_ball(width, radius)) for width, radius in bands_radii]
            self._tables = [{} for _ in self._layout]

    def __len__(self) -> int:
        return len(self._codes)

    def add(self, code: int, item: T) -> None:
        """Store ``code`` with ``item``."""
        entry = len(self._codes)
        self._codes.append(code)
        self._items.append(item)
        if not self._tables:  # scanned, never looked up
            return
        for (shift, width), table in zip(self._layout, self._tables, strict=True):
            table.setdefault((code >> shift) & ((1 << width) - 1), []).append(entry)

    def within(self, code: int) -> list[tuple[int, T]]:
        """Every stored ``(distance, item)`` at most ``max_distance`` bits from ``code``,
        nearest first, then in the order they were added."""
        found = sorted(self._matches(code))
        return [(d, self._items[entry]) for d, entry in found]

    def nearest(self, code: int) -> tuple[int, T] | None:
        """The stored ``(distance, item)`` nearest ``code`` within ``max_distance`` (the first
        added among equals), or None."""
        found = self._matches(code)
        if not found:
            return None
        d, entry = min(found)
        return d, self._items[entry]

    def _matches(self, code: int) -> list[tuple[int, int]]:
        """``(distance, entry)`` of every stored hash within ``max_distance`` of ``code``."""
        limit = self.max_distance
        codes = self._codes
        if self._masks is None or len(codes) <= self._probes:
            self.compared += len(codes)
            return [(d, entry) for entry, other in enumerate(codes)
                    if (d := (code ^ other).bit_count()) <= limit]
        candidates: set[int] = set()
        bands = zip(self._layout, self._masks, self._tables, strict=True)
        for (shift, width), masks, table in bands:
            value = (code >> shift) & ((1 << width) - 1)
            get = table.get
            for mask in masks:
                bucket = get(value ^ mask)
                if bucket is not None:
                    candidates.update(bucket)
        self.compared += len(candidates)
        return [(d, entry) for entry in candidates
                if (d := (code ^ codes[entry]).bit_count()) <= limit]


def _bands(bits: int, count: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of ``count`` disjoint bands covering ``bits`` bits, as even as can be."""
    base, extra = divmod(bits, count)
    layout, shift = [], 0
    for n in range(count):
        width = base + (1 if n < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _radii(max_distance: int, count: int) -> list[int]:
    """Each band's search radius, by the pigeonhole principle: ``s`` for the first ``a + 1``
    bands and ``s - 1`` for the others, where ``max_distance = s*count + a``; -1 is a band
    that need not be searched."""
    s, a = divmod(max_distance, count)
    return [s if n <= a else s - 1 for n in range(count)]


def _ball_size(width: int, radius: int) -> int:
    """How many values of ``width`` bits lie within ``radius`` bits of one."""
    return sum(math.comb(width, k) for k in range(min(radius, width) + 1))


def _ball(width: int, radius: int) -> Iterator[int]:
    """The masks that flip at most ``radius`` of ``width`` bits, fewest flips first."""
    for k in range(min(radius, width) + 1):
        for positions in combinations(range(width), k):
            mask = 0
            for p in positions:
                mask |= 1 << p
            yield mask
