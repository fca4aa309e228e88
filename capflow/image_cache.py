"""The prepared-image cache: each photo decoded, downscaled and re-encoded once, not once a job.

A sweep runs one job per prompt over the same photos; without this cache every job prepares
every photo again. Entries are keyed by the source file (its real path, device, inode, size,
modification and change times) and by the preparation settings that shape the result, so an
edited file or a changed setting misses. The value is the encoded image and its size; an image
sent as it is (already within budget, in a format every API accepts) is stored without its
bytes, which are read from the file again on a hit.

SQLite in WAL mode, shared by the threads that prepare rows and by parallel capflow processes.
The cache is an optimisation only: a file that cannot be opened or written (a read-only
folder, a full disk, a corrupt file) logs one warning and images are prepared without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

# A hit moves an entry's last use forward only when it is older than this, so a sweep's
# later jobs read without writing; least recently used is therefore exact to within an hour.
TOUCH_SECONDS = 3600
EVICT_TO = 0.9  # eviction frees room down to this fraction of max_bytes: a batch, not one a put
_ROW_OVERHEAD = 128  # bytes an entry costs beside its image: key, fields, index entries
_AS_IS_IN_MEMORY = 100_000  # entries of files sent as they are, kept in memory too
_BUSY_SECONDS = 10.0  # how long a write waits for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    key BLOB PRIMARY KEY,
    data BLOB,
    mime TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    source_size INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_use ON images (used);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, bytes) VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS images_added AFTER INSERT ON images
BEGIN UPDATE totals SET bytes = bytes + NEW.bytes; END;
CREATE TRIGGER IF NOT EXISTS images_removed AFTER DELETE ON images
BEGIN UPDATE totals SET bytes = bytes - OLD.bytes; END;
"""


class EncodedImage(NamedTuple):
    """An image encoded for sending.

    :param data: the bytes sent.
    :param mime: their media type.
    :param width: width in pixels.
    :param height: height in pixels.
    :param source_size: bytes of the source image.
    :param as_is: ``data`` is the source file's own bytes, sent unchanged.
    """

    data: bytes
    mime: str
    width: int
    height: int
    source_size: int
    as_is: bool = False


def image_key(path: str, info: os.stat_result, settings: str) -> bytes:
    """The cache key of the file at real path ``path``, whose stat is ``info``, prepared with
    ``settings``. The change time catches a file rewritten with its old modification time put
    back (``cp -p``, ``touch -r``)."""
    ident = "\0".join(map(str, (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                                info.st_ctime_ns, settings)))
    return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).digest()


class PreparedImageCache:
    """Prepared images keyed by ``image_key``, within ``max_bytes``.

    The file is opened on first use, from whichever thread gets there first; one connection
    serves every thread, under a lock held only while SQLite works. ``hits``, ``misses``,
    ``stored`` and ``evicted`` count this object's own lookups and writes.

    :param path: the SQLite file (created with its folder when first written).
    :param max_bytes: the most bytes of entries kept; beyond it the least recently used go.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = 2_000_000_000) -> None:
        # Made absolute now: the file is opened later, whatever the working folder is then.
        self.path = Path(path).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.evicted = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._failed = False
        # Entries of files sent as they are hold no bytes: kept in memory too, so that a
        # dataset of small images that repeat is not one SQLite query per row.
        self._as_is: dict[bytes, EncodedImage] = {}

    def get(self, key: bytes) -> EncodedImage | None:
        """The entry for ``key``, or None. An entry sent as it is comes back with empty
        ``data``: the caller reads the file."""
        known = self._as_is.get(key)
        if known is not None:
            self.hits += 1
            return known
        with self._lock:
            db = self._connection()
            if db is None:
                return None
            try:
                row = db.execute(
                    "SELECT data, mime, width, height, source_size, used FROM images WHERE key=?",
                    (key,),
                ).fetchone()
            except sqlite3.Error as exc:
                if not _busy(exc):
                    self._fail(exc)
                return None
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            data, mime, width, height, source_size, used = row
            now = time.time()
            if now - used >= TOUCH_SECONDS:
                try:
                    db.execute("UPDATE images SET used=? WHERE key=?", (now, key))
                except sqlite3.Error as exc:  # the entry is good; only its age is stale
                    log.debug("could not record the use of a cached image: %s", exc)
        found = EncodedImage(data or b"", mime, width, height, source_size, data is None)
        if found.as_is:
            self._remember(key, found)
        return found

    def _remember(self, key: bytes, image: EncodedImage) -> None:
        if len(self._as_is) >= _AS_IS_IN_MEMORY:
            self._as_is.clear()  # a bound, not a policy: the file still has them all
        self._as_is[key] = image

    def put(self, key: bytes, image: EncodedImage) -> None:
        """Store ``image`` under ``key`` (kept without its bytes when ``image.as_is``), then
        evict the least recently used entries should the cache be over ``max_bytes``."""
        data = None if image.as_is else image.data
        if image.as_is:
            self._remember(key, image)
        size = len(data or b"") + _ROW_OVERHEAD
        if size > self.max_bytes * EVICT_TO:
            return  # it would evict everything, itself included
        with self._lock:
            db = self._connection()
            if db is None:
                return
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    added = db.execute(
                        "INSERT OR IGNORE INTO images (key, data, mime, width, height,"
                        " source_size, bytes, used) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, data, image.mime, image.width, image.height, image.source_size,
                         size, time.time()),
                    ).rowcount
                    total = db.execute("SELECT bytes FROM totals").fetchone()[0]
                    evicted = self._evict(db, total) if total > self.max_bytes else 0
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                if _busy(exc):  # another process held the file too long: this one goes unkept
                    log.debug("cached image not stored, the cache is busy: %s", exc)
                else:
                    self._fail(exc)
                return
            self.stored += added
            self.evicted += evicted

    def _evict(self, db: sqlite3.Connection, total: int) -> int:
        """Delete the least recently used entries until ``EVICT_TO`` of ``max_bytes`` is left."""
        excess = total - int(self.max_bytes * EVICT_TO)
        victims: list[tuple[bytes]] = []
        freed = 0
        oldest_first = db.execute("SELECT key, bytes FROM images ORDER BY used, rowid")
        for key, size in oldest_first:
            if freed >= excess:
                break
            victims.append((key,))
            freed += size
        oldest_first.close()
        db.executemany("DELETE FROM images WHERE key=?", victims)
        return len(victims)

    def entries(self) -> int:
        """How many images the cache holds (0 when it cannot be read)."""
        return self._count("SELECT COUNT(*) FROM images")

    def size(self) -> int:
        """Bytes of entries counted against ``max_bytes`` (0 when it cannot be read)."""
        return self._count("SELECT bytes FROM totals")

    def _count(self, query: str) -> int:
        with self._lock:
            db = self._connection()
            if db is None:
                return 0
            try:
                return int(db.execute(query).fetchone()[0])
            except sqlite3.Error as exc:
                self._fail(exc)
                return 0

    def close(self) -> None:
        """Close the file; a later use opens it again."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connection(self) -> sqlite3.Connection | None:
        """The open database (opened now if need be), or None once it has failed."""
        if self._db is not None or self._failed:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=_BUSY_SECONDS)
            try:
                _set_up(db)
            except sqlite3.Error:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._fail(exc)
            return None
        self._db = db
        weakref.finalize(self, db.close)  # checkpoints the WAL at exit, whoever forgot close
        return db

    def _fail(self, exc: BaseException) -> None:
        """Stop using the cache for good, saying why once."""
        self._failed = True
        if self._db is not None:
            self._db.close()
            self._db = None
        reason: object = exc
        if isinstance(exc, OSError) and exc.strerror:  # "Not a directory: /x", not "[Errno 20] ..."
            reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        log.warning("the prepared-image cache %s cannot be used (%s): images are prepared"
                    " without it", self.path, reason)


def _set_up(db: sqlite3.Connection) -> None:
    """WAL mode and the tables. Switching to WAL does not wait for another process that is
    creating the file at the same moment (SQLite answers "locked" at once), hence the retries."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost entry costs only a decode
            # Entries are read once a job, each: pages kept in memory would rarely be read
            # again, and would sit beside the images being prepared.
            db.execute("PRAGMA cache_size=-256")
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _busy(exc: sqlite3.Error) -> bool:
    """``exc`` says another connection held the file past the busy timeout."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))
