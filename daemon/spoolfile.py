"""The event spool's file: one SQLite database of events (and the high-water mark
of their sequence numbers) with a lock file beside it.  Every method runs on the
spool's one writer thread, in order (:class:`daemon.spool.EventSpool` calls them
there), so a write and a read never race and the event loop never touches the disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# The spool's one logger, whichever of its modules speaks: log filters and the tests
# name it.
log = logging.getLogger("daemon.spool")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(slots=True)
class Row:
    seq: int
    topic: str
    payload: bytes
    retain: bool

    @property
    def size(self) -> int:
        return len(self.topic) + len(self.payload)


@dataclass(slots=True)
class Written:
    """What one transaction did (returned from the writer thread)."""

    events: int
    bytes: int
    dropped: int
    dropped_last: int
    direct: list[Row]  # written and taken for the forwarder at once (no read back)


class SpoolFile:
    """The events on disk, bounded in rows and bytes (oldest unsent dropped first);
    in memory only when the file cannot be used (:attr:`durable` False)."""

    def __init__(self, path: Path, *, max_events: int, max_bytes: int) -> None:
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.durable = False  # on disk (False: in memory, see open)
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._read = 0  # highest seq taken for the forwarder
        self._committed = 0  # highest seq written
        self._events = 0  # rows on disk, and their bytes
        self._bytes = 0

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self) -> tuple[int, int, int, int]:
        try:
            db = self._open_file()
            self.durable = True
        except (OSError, sqlite3.Error) as exc:
            # Another daemon with this node id on this state_dir, a read-only or full
            # disk: events still go out, in order, but do not outlive this process.
            log.warning(
                "event spool %s unusable (%s): events are kept in memory only", self.path, exc
            )
            db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            db.executescript(SCHEMA)
        self._db = db
        row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        top, count, size = db.execute(
            "SELECT MAX(seq), COUNT(*), SUM(length(topic) + length(payload)) FROM events"
        ).fetchone()
        next_seq = max(row[0] if row else 1, (top or 0) + 1)
        self._committed = top or 0
        self._events, self._bytes = count, size or 0
        return next_seq, self._committed, count, size or 0

    def _open_file(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise OSError(f"another process holds {self.path}.lock ({exc.strerror})") from exc
        self._lock_fd = fd
        # What a node saw and heard: the daemon's alone.
        self.path.touch(mode=0o600, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        return db

    def write(self, rows: list[Row], acked: list[tuple[int, int]], direct: int) -> Written:
        db = self._db
        assert db is not None
        caught_up = self._read >= self._committed  # the forwarder has read all before
        db.execute("BEGIN")
        try:
            if rows:
                db.executemany(
                    "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)",
                    [(r.seq, r.topic, r.payload, int(r.retain)) for r in rows],
                )
            if acked:
                db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s, _ in acked])
            if rows:
                # The high-water mark of what is *written*: an event made but not yet
                # written when the process dies never left it, and its seq may be used
                # again; one that was written (and maybe delivered) never is.
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (rows[-1].seq + 1,)
                )
            events = self._events + len(rows) - len(acked)
            size = self._bytes + sum(r.size for r in rows) - sum(n for _, n in acked)
            dropped, last, events, size = self._drop_oldest(db, events, size)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._events, self._bytes = events, size
        taken: list[Row] = []
        if rows:
            self._committed = rows[-1].seq
            kept = [r for r in rows if r.seq > last]
            if caught_up and kept and len(kept) <= direct:
                taken = kept
                self._read = kept[-1].seq
        return Written(events, size, dropped, last, taken)

    def _drop_oldest(
        self, db: sqlite3.Connection, events: int, size: int
    ) -> tuple[int, int, int, int]:
        """Over a bound: delete the oldest events the forwarder has not taken yet."""
        dropped = last = 0
        while events > self.max_events or size > self.max_bytes:
            over = events - self.max_events
            candidates = db.execute(
                "SELECT seq, length(topic) + length(payload) FROM events"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._read, max(over, 64)),
            ).fetchall()
            if not candidates:
                break  # only events handed to the bus are left: they leave on their own
            cut = 0
            for seq, n in candidates:
                if events <= self.max_events and size <= self.max_bytes:
                    break
                events, size, dropped, last = events - 1, size - n, dropped + 1, seq
                cut += 1
            db.execute("DELETE FROM events WHERE seq > ? AND seq <= ?", (self._read, last))
            if cut < len(candidates):
                break
        return dropped, last, events, size

    def take(self, limit: int) -> tuple[list[Row], int]:
        """The next events in seq order, after the last taken (writer thread)."""
        db = self._db
        assert db is not None
        rows = [
            Row(seq, topic, payload, bool(retain))
            for seq, topic, payload, retain in db.execute(
                "SELECT seq, topic, payload, retain FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (self._read, limit),
            )
        ]
        # Everything written up to now has been seen when the page is not full (rows
        # dropped meanwhile included): without that a dropped tail would be read forever.
        self._read = rows[-1].seq if len(rows) == limit else max(self._read, self._committed)
        return rows, self._read

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None
