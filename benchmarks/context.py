"""What every scenario is handed: size, scratch space and the dataset cache."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Context:
    """Settings of one ``python -m benchmarks`` invocation.

    :param quick: shrink row counts about tenfold (a smoke run).
    :param with_reference: run the reference client beside capflow in throughput scenarios.
    :param workdir: scratch space for this invocation's runs (outputs, journals, logs).
    :param cache_root: generated datasets, kept between invocations.
    :param seed: seed of random choices (the kill moment); None for a fresh one.
    """

    quick: bool
    with_reference: bool
    workdir: Path
    cache_root: Path
    seed: int | None = None
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def size(self, full: int, quick: int | None = None) -> int:
        """``full`` rows, or about a tenth of them with ``--quick``."""
        if not self.quick:
            return full
        return quick if quick is not None else max(1, full // 10)

    def rundir(self, *parts: str) -> Path:
        """A fresh folder under the work dir."""
        path = self.workdir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=False)
        return path
