"""The run journal: every finished row, made durable as it finishes.

SQLite in WAL mode: each commit survives a crash or ``kill -9`` of the process, many engine
tasks can hand rows over at once, and the finished rows can be read back in input order to
write the step's output. The journal also remembers what it was written for (a fingerprint of
input and settings), so a rerun of the same command picks up where the last one stopped.

A journal belongs to one run at a time: it takes the output's run lock
(``capflow.storage.lock``) before it opens or clears the database, and keeps it until
``close()``, so a second run on the same output stops at once instead of clearing or mixing
the first one's rows.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from capflow.storage.lock import RunLock

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (idx INTEGER PRIMARY KEY, ok INTEGER NOT NULL, line TEXT NOT NULL);
"""


class RunJournal:
    """Finished rows of one storage step, keyed by their input index.

    :param path: the SQLite file (created if missing).
    :param fingerprint: identifies input and settings; a journal written for another
        fingerprint is cleared, since its rows would be stale.
    :param lock: the run lock of this journal, when the caller took it earlier (it is then
        released by ``close()``); by default the journal takes it itself.
    :raises capflow.errors.ConfigError: another run holds the lock.
    """

    def __init__(self, path: Path, fingerprint: str, lock: RunLock | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Before the database is touched: the rows in it may be another live run's.
        self._lock = (lock or RunLock(path)).acquire()
        db = None
        try:
            db = self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._open(fingerprint)
        except BaseException:
            if db is not None:
                db.close()
            self._lock.release()
            raise

    def _open(self, fingerprint: str) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed row survives the process dying at any point.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
        if row is None or row[0] != fingerprint:
            (stale,) = self._db.execute("SELECT COUNT(*) FROM rows").fetchone()
            if stale:
                log.info("%s holds %d rows of a run with another input or other settings: the"
                         " step starts afresh (the response cache still answers what was asked"
                         " before)", self.path, stale)
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM rows")
            self._db.execute("DELETE FROM meta WHERE key LIKE 'spent.%'")
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('fingerprint', ?)", (fingerprint,)
            )
            self._db.execute("COMMIT")

    def done_indices(self) -> Iterator[int]:
        """Indices of rows already finished successfully, ascending."""
        yield from (i for (i,) in self._db.execute("SELECT idx FROM rows WHERE ok=1 ORDER BY idx"))

    def finished_indices(self) -> Iterator[int]:
        """Indices of every row already finished, failed ones included, ascending."""
        yield from (i for (i,) in self._db.execute("SELECT idx FROM rows ORDER BY idx"))

    def failed_lines(self) -> Iterator[str]:
        """The JSON text of every failed row, in input order."""
        query = "SELECT line FROM rows WHERE ok=0 ORDER BY idx"
        yield from (line for (line,) in self._db.execute(query))

    def counts(self) -> tuple[int, int]:
        """(rows finished successfully, rows failed) so far."""
        ok, failed = self._db.execute(
            "SELECT COALESCE(SUM(ok), 0), COALESCE(SUM(1 - ok), 0) FROM rows"
        ).fetchone()
        return int(ok), int(failed)

    def add(self, batch: list[tuple[int, bool, str]], spent: dict[str, float] | None = None
            ) -> None:
        """Make a batch of finished rows (index, ok, JSON text) durable in one commit, with
        what was spent on them (added to ``spent()``)."""
        try:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", batch)
            if spent:
                totals = self.spent()
                self._db.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [(f"spent.{k}", repr(totals.get(k, 0) + v)) for k, v in spent.items()])
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def lines(self) -> Iterator[str]:
        """Every finished row's JSON text, in input order."""
        yield from (line for (line,) in self._db.execute("SELECT line FROM rows ORDER BY idx"))

    def spent(self) -> dict[str, float]:
        """What the runs that wrote this journal's rows spent (tokens, cost, seconds, requests),
        summed; it starts afresh with the rows."""
        totals: dict[str, float] = {}
        for key, value in self._db.execute("SELECT key, value FROM meta WHERE key LIKE 'spent.%'"):
            try:
                totals[key.removeprefix("spent.")] = float(value)
            except ValueError:
                continue
        return totals

    def close(self) -> None:
        """Close the database (what was committed stays), then let the next run in."""
        try:
            self._db.close()
        finally:
            self._lock.release()
