"""The storage interface: where rows come from and where finished rows go."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

from capflow.rows import Row


class Storage(ABC):
    """Reads the rows of one pipeline step and writes the step's finished rows.

    ``step()`` returns the view an operator runs on (the seed's ``storage.step()``); each step
    reads what the previous one wrote.
    """

    @abstractmethod
    def step(self, output: str | None = None) -> Storage:
        """The next step's view. ``output`` names where that step's rows go instead of the
        default step file (the CLI passes the ``output`` knob for the last step)."""

    @abstractmethod
    def read(self) -> Iterator[Row]:
        """The step's input rows, streamed in order."""

    def check(self) -> None:
        """Find what would make the step fail before anything is spent: an input that cannot
        be read or decoded, an output that cannot be written. Raise
        ``capflow.errors.ConfigError`` with a one-line message; the default checks nothing."""

    def count(self, cheap_only: bool = False) -> int | None:
        """How many rows ``read()`` will yield, or None when unknown. With ``cheap_only``, only
        when it costs much less than reading the rows (else None)."""
        return None

    @property
    def reads_earlier_step(self) -> bool:
        """Whether this step's rows are an earlier step's output: a row that failed there then
        passes through this step as failed, with its error record, and is not asked again."""
        return False

    @property
    @abstractmethod
    def base_dir(self) -> Path:
        """The folder that relative image paths in rows are resolved against."""

    @property
    @abstractmethod
    def input_name(self) -> str:
        """A human-readable name for the step's input (for logs and summaries)."""

    @property
    @abstractmethod
    def output_name(self) -> str:
        """A human-readable name for where the step's rows go."""

    @abstractmethod
    def input_identity(self) -> str:
        """A string that changes when the step's input changes (used to resume safely)."""

    @abstractmethod
    def journal_path(self) -> Path:
        """Where the engine keeps each finished row durably while the step runs."""

    @abstractmethod
    def write(self, lines: Iterable[str]) -> None:
        """Write the step's finished rows (one JSON object text each, in input order)."""
