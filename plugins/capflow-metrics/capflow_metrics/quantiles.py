"""Latency percentiles in bounded memory.

A run may finish millions of rows; the plugin must not keep them. ``LatencySample`` keeps
every value (8 bytes each, in an ``array('d')``) up to ``capacity`` values, so that the
percentiles of an ordinary run are exact, and beyond that a uniform random sample of that size
(reservoir sampling, Vitter's algorithm R), whose percentiles are close estimates. The count,
sum and maximum are always exact.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Iterable

DEFAULT_CAPACITY = 100_000  # 800 kB per series; exact percentiles up to this many rows


class LatencySample:
    """Durations in seconds: exact count, sum and maximum, percentiles from a bounded sample."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self._values = array("d")
        self._random = random.Random(seed)  # seeded: a rerun estimates the same way
        self._sorted: list[float] | None = None

    def add(self, value: float) -> None:
        """Record one duration."""
        self.count += 1
        self.sum += value
        self.max = max(self.max, value)
        self._sorted = None
        if len(self._values) < self.capacity:
            self._values.append(value)
            return
        slot = self._random.randrange(self.count)
        if slot < self.capacity:
            self._values[slot] = value

    @property
    def exact(self) -> bool:
        """Whether every value is still kept (the percentiles are exact)."""
        return self.count <= self.capacity

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 <= q <= 1), interpolated linearly between the two nearest
        values (as ``statistics.quantiles(method="inclusive")`` and numpy's default do); NaN
        when there is no value."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is not between 0 and 1")
        if not self._values:
            return math.nan
        if self._sorted is None:
            self._sorted = sorted(self._values)
        values = self._sorted
        position = q * (len(values) - 1)
        low = math.floor(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)

    def quantiles(self, qs: Iterable[float]) -> dict[float, float]:
        """``quantile(q)`` for each of ``qs``."""
        return {q: self.quantile(q) for q in qs}
