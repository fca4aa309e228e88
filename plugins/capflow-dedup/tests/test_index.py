"""HammingIndex against brute force: the same matches, in the same order, through the banded
look-ups and through the plain scan; and far fewer comparisons than a scan on many hashes."""

from __future__ import annotations

import random

import pytest
from capflow_dedup.index import HammingIndex


def flipped(rng: random.Random, code: int, bits: int, flips: int) -> int:
    for position in rng.sample(range(bits), flips):
        code ^= 1 << position
    return code


def hashes(rng: random.Random, bits: int, count: int, radius: int) -> list[int]:
    """Random hashes, about half of them copies of an earlier one with 0 to radius+2 bits
    flipped: matches, near misses and strangers alike."""
    out: list[int] = []
    for _ in range(count):
        if out and rng.random() < 0.5:
            out.append(flipped(rng, rng.choice(out), bits, rng.randrange(radius + 3)))
        else:
            out.append(rng.getrandbits(bits))
    return out


def brute_force(stored: list[int], code: int, radius: int) -> list[tuple[int, int]]:
    found = [((code ^ other).bit_count(), n) for n, other in enumerate(stored)]
    return sorted((d, n) for d, n in found if d <= radius)


@pytest.mark.parametrize(("bits", "radius", "bands", "count"), [
    (64, 6, None, 1000),   # the default: four 16-bit bands, radius 1, 1, 1 and 0
    (64, 0, None, 1000),   # exact matches: one band
    (64, 10, None, 1000),
    (64, 6, 1, 1000),      # one band searched to the full radius
    (64, 6, 7, 1000),      # radius + 1 bands, each searched for its exact value
    (16, 3, None, 1000),   # one band, radius 3: 697 look-ups, so a scan up to 697 hashes
    (256, 20, None, 1000), # hash_size 16
    (64, 30, None, 400),   # so wide that only a scan makes sense
])
def test_the_index_finds_what_brute_force_finds(bits, radius, bands, count):
    rng = random.Random(bits * 1000 + radius * 10 + (bands or 0))
    index: HammingIndex[int] = HammingIndex(bits, radius, bands=bands)
    stored = hashes(rng, bits, count, radius)
    queries = hashes(rng, bits, 200, radius) + [flipped(rng, rng.choice(stored), bits, k)
                                                for k in range(radius + 3)
                                                for _ in range(10)]
    for n, code in enumerate(stored):
        expected = brute_force(stored[:n], code, radius)
        assert index.within(code) == expected, (n, code)
        assert index.nearest(code) == (expected[0] if expected else None)
        index.add(code, n)
    for code in queries:
        expected = brute_force(stored, code, radius)
        assert index.within(code) == expected
        assert index.nearest(code) == (expected[0] if expected else None)


def test_nearest_prefers_the_closest_then_the_first_added():
    index: HammingIndex[str] = HammingIndex(64, 6)
    for n in range(100):  # enough hashes for the banded look-ups to be used
        index.add((0xFFFF_FFFF << 32) | n, f"filler{n}")  # 32+ bits from the others
    index.add(0b1111, "four bits away")
    index.add(0b0011, "two bits away")
    index.add(0b1100, "also two bits away")
    assert index.nearest(0) == (2, "two bits away")
    assert [item for _, item in index.within(0)] == [
        "two bits away", "also two bits away", "four bits away"]
    assert index.nearest(0b1111111 << 8) is None  # 9 to 11 bits from each of the three


def test_a_query_compares_with_a_few_hashes_not_all():
    rng = random.Random(7)
    index: HammingIndex[int] = HammingIndex(64, 6)
    count = 10_000
    for n in range(count):
        code = rng.getrandbits(64)
        if index.nearest(code) is None:
            index.add(code, n)
    # A scan would make count*(count-1)/2 comparisons, 5,000 per query on average.
    assert index.compared / count < 50, index.compared / count
