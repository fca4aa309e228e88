"""What observers of a run see: the run's description, each finished row, the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RunInfo:
    """A run about to start over one storage step.

    ``config`` is the composed config of the command line's run, resolved, with no secret in
    it (keys live in the environment); empty when the run was started from Python.
    """

    input: str
    output: str
    operator: str
    serving: str
    rows: int | None
    dry_run: bool
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RowResult:
    """One finished row: ``error`` is the error record when it failed, else None.

    Times are ``time.monotonic()`` seconds: ``queued`` when the row was taken in, ``sent`` when
    its first request went out and ``answered`` when its answer came (None when nothing was
    sent, or no answer came). ``attempts`` counts its requests (retries and re-asks included);
    ``cached`` is True when the response cache answered it.
    """

    index: int
    line: str
    error: dict[str, str] | None = None
    queued: float | None = None
    sent: float | None = None
    answered: float | None = None
    attempts: int = 0
    cached: bool = False


@dataclass
class RunSummary:
    """Counts for a finished (or stopped) run."""

    rows: int = 0
    total: int | None = None  # rows in the input, when known
    done: int = 0
    failed: int = 0
    skipped: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_bytes: int = 0
    images: int = 0
    elapsed: float = 0.0
    dry_run: bool = False
    output: str = ""
    journal: str = ""
    stopped: str | None = None
    failures: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    example: list[dict[str, Any]] | None = None  # a dry run's first request
    image_tokens: int = 0
    row_estimates: list[tuple[int, int, int]] = field(default_factory=list)  # dry run: first rows
    cache_hits: int = 0
    cache_size: int = 0
    cost: float = 0.0
    saved: float = 0.0  # what the same answers would have cost more as live requests
    output_ok: int = 0  # rows in the output: captioned (this run or earlier ones) ...
    output_failed: int = 0  # ... and with an error record
    estimated_usage: int = 0  # answers without usage, whose tokens were estimated
    max_workers: int = 0  # the ceiling of requests in flight ...
    limit: int = 0  # ... the adaptive limit at the end ...
    limit_lowest: int = 0  # ... and at its lowest
    rate_limited: int = 0  # 429 answers
    learned_rate: float | None = None  # requests per second learned from 429s, if any
    outages: int = 0  # times the circuit breaker stopped the sending
    dropped: int = 0  # rows a filter step left out of its output ...
    dropped_output: str = ""  # ... and the file they went to

    @property
    def ok(self) -> bool:
        """True when no row failed (in this run or, kept, from an earlier one) and the run was
        not stopped early."""
        return self.failed == 0 and self.output_failed == 0 and self.stopped is None
