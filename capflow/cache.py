"""The response cache: answers stored under a key made from everything that determines them.

The key covers the full message list (images included, as the prepared bytes the request
carries), the model and the generation parameters. A rerun, a resumed run, or a run that only
changed the output path or an unrelated field sends no request whose answer is already here.
SQLite in WAL mode: each commit survives ``kill -9``, and several capflow processes can share
one cache file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from capflow.request import Request, Response, Usage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT,
    model TEXT,
    refusal TEXT
);
"""


def request_key(request: Request, serving: dict[str, Any]) -> str:
    """The cache key of ``request`` sent to a serving described by ``serving``."""
    what: list[Any] = [request.messages, serving]
    if request.body:  # only then: the keys of answers cached before stay as they were
        what.append(request.body)
    blob = json.dumps(what, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache:
    """Successful responses keyed by ``request_key``.

    :param path: the SQLite file (created with its folder if missing).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "refusal" not in columns:  # a cache written by an earlier capflow
            with contextlib.suppress(sqlite3.OperationalError):  # another run just added it
                self._db.execute("ALTER TABLE responses ADD COLUMN refusal TEXT")
        self._pending: list[tuple] = []
        self.hits = 0
        self.stored = 0

    def get(self, key: str) -> Response | None:
        """The stored response for ``key``, or None."""
        row = self._db.execute(
            "SELECT text, prompt_tokens, completion_tokens, finish_reason, model, refusal"
            " FROM responses WHERE key=?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        self.hits += 1
        text, prompt, completion, finish, model, refusal = row
        return Response(text, Usage(prompt, completion), finish, model, refusal)

    def put(self, key: str, response: Response) -> None:
        """Queue ``response`` for the next ``commit``."""
        usage = response.usage
        self._pending.append((key, response.text, usage.prompt_tokens, usage.completion_tokens,
                              response.finish_reason, response.model, response.refusal))

    def commit(self) -> None:
        """Make every queued response durable in one transaction."""
        if not self._pending:
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO responses (key, text, prompt_tokens, completion_tokens,"
                " finish_reason, model, refusal) VALUES (?, ?, ?, ?, ?, ?, ?)", self._pending
            )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise  # the answers stay queued for the next commit
        self.stored += len(self._pending)
        self._pending = []

    def size(self) -> int:
        """How many responses the cache holds."""
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        """Commit what is queued and close the database."""
        self.commit()
        self._db.close()
