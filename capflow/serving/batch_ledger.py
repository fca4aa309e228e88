"""The batch ledger: which request lines went into which batch, durably, so that a capflow
killed at any moment never submits a line again that a batch already carries.

An SQLite file (WAL, every change committed at once) beside the response cache. A line is
known by its ``custom_id``, a digest of its request body: the same row asked again in a later
run is the same line. States:

- a batch: ``submitting`` (its lines recorded, before upload: after a kill, the server's list
  of batches says, by the batch's metadata, whether it was created), ``submitted`` (its remote
  id known: polled until it ends), ``collected`` (its results read);
- a line: ``queued`` (in a batch being submitted), ``submitted``, ``done`` (its answer kept
  here, as the API returned it), ``failed`` (its last error kept).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    local TEXT PRIMARY KEY, remote TEXT, input_file TEXT, state TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    custom_id TEXT PRIMARY KEY, local TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL, result TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS lines_by_batch ON lines(local);
"""


@dataclass(frozen=True)
class Line:
    custom_id: str
    local: str | None
    attempts: int
    state: str
    result: str | None
    error: str | None


@dataclass(frozen=True)
class Batch:
    local: str
    remote: str | None
    input_file: str | None
    state: str


class BatchLedger:
    """The ledger at ``path`` (created with its folder when needed)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- lines --------------------------------------------------------------------------------

    def line(self, custom_id: str) -> Line | None:
        row = self._db.execute(
            "SELECT custom_id, local, attempts, state, result, error FROM lines"
            " WHERE custom_id = ?", (custom_id,)).fetchone()
        return Line(*row) if row else None

    def lines_of(self, local: str) -> list[Line]:
        rows = self._db.execute(
            "SELECT custom_id, local, attempts, state, result, error FROM lines WHERE local = ?",
            (local,)).fetchall()
        return [Line(*row) for row in rows]

    def done(self, custom_id: str, result: str) -> None:
        self._db.execute("UPDATE lines SET state = 'done', result = ?, error = NULL"
                         " WHERE custom_id = ?", (result, custom_id))

    def failed(self, custom_id: str, error: str) -> None:
        self._db.execute("UPDATE lines SET state = 'failed', error = ? WHERE custom_id = ?",
                         (error, custom_id))

    def forget(self, custom_ids: list[str]) -> None:
        """Lines that no batch carries after all (its creation never happened)."""
        self._db.executemany("DELETE FROM lines WHERE custom_id = ?",
                             [(c,) for c in custom_ids])

    # -- batches ------------------------------------------------------------------------------

    def begin(self, local: str, custom_ids: list[str]) -> None:
        """Record a batch and its lines before anything is uploaded (one transaction); each
        line's attempts count up."""
        with self._transaction():
            self._db.execute("INSERT INTO batches (local, state, created) VALUES (?, ?, ?)",
                             (local, "submitting", time.time()))
            self._db.executemany(
                "INSERT INTO lines (custom_id, local, attempts, state) VALUES (?, ?, 1, 'queued')"
                " ON CONFLICT(custom_id) DO UPDATE SET local = excluded.local,"
                " attempts = lines.attempts + 1, state = 'queued', error = NULL",
                [(c, local) for c in custom_ids])

    def uploaded(self, local: str, input_file: str) -> None:
        self._db.execute("UPDATE batches SET input_file = ? WHERE local = ?", (input_file, local))

    def submitted(self, local: str, remote: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE batches SET remote = ?, state = 'submitted' WHERE local = ?",
                             (remote, local))
            self._db.execute("UPDATE lines SET state = 'submitted' WHERE local = ?"
                             " AND state = 'queued'", (local,))

    def collected(self, local: str) -> None:
        self._db.execute("UPDATE batches SET state = 'collected' WHERE local = ?", (local,))

    def dropped(self, local: str) -> None:
        """A batch that was never created: it and its unanswered lines go."""
        with self._transaction():
            self._db.execute("DELETE FROM lines WHERE local = ? AND state IN ('queued',"
                             " 'submitted')", (local,))
            self._db.execute("DELETE FROM batches WHERE local = ?", (local,))

    def batch(self, local: str) -> Batch | None:
        row = self._db.execute("SELECT local, remote, input_file, state FROM batches"
                               " WHERE local = ?", (local,)).fetchone()
        return Batch(*row) if row else None

    def open_batches(self) -> list[Batch]:
        """Batches not yet collected, oldest first."""
        rows = self._db.execute("SELECT local, remote, input_file, state FROM batches"
                                " WHERE state != 'collected' ORDER BY created").fetchall()
        return [Batch(*row) for row in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
