"""The storage interface: where rows come from and where finished rows go."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from capflow.rows import Row


class Storage(ABC):
    """Reads the rows of one pipeline step and writes the step's finished rows.

    ``step()`` returns the view an operator runs on (the seed's ``storage.step()``); each step
    reads what the previous one wrote. Most storages subclass
    ``capflow.storage.streaming.StreamingStorage``, which implements everything here but reading
    and writing their own format; docs/plugins.md has the whole contract.
    """

    #: What ``write()`` is given: ``"dicts"``, each finished row as a dict (the contract), or
    #: ``"json"``, each row's JSON text, which a storage of JSON text writes without parsing it
    #: (the built-in ``FileStorage`` does).
    rows_as: ClassVar[Literal["dicts", "json"]] = "dicts"

    #: The row key holding each row's image (or list of images), when the storage knows it:
    #: the pipelines' steps read their images from there (``storage.image_key`` in the config).
    image_key: str | None = None

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
    def write(self, rows: Iterable[Any]) -> None:
        """Write the step's finished rows, in input order, replacing the output whole.

        Each row is a dict: the input row's fields and the step's output fields (a row that
        failed has an ``_error`` record instead), or its JSON text when ``rows_as`` is
        ``"json"``. ``rows`` is streamed from the run's journal and can be iterated more than
        once (a format that needs its columns before its rows reads it twice); it is called
        once, after the step, and again by a rerun. Raise ``capflow.errors.CapflowError`` with
        a one-line message when the output cannot be written: the rows stay in the journal.
        """
