"""Task history, statistics rows and the active-task journal in SQLite.

All SQLite work happens on one dedicated thread (never on the event loop), in batches:
the loop collects writes and a writer task flushes them, one transaction per
batch, every ``FLUSH_INTERVAL`` or when ``FLUSH_BATCH`` are pending.  WAL mode,
bounded retention.  Raw inputs (audio, images) are never stored — only sizes.

The ``active`` table is the journal that lets an orchestrator restart without
losing queued or running tasks: a task is written at the first flush after its
submission and deleted when it ends; on start-up every row is queued again
(at-least-once, deduplicated by task id).  A task that ends before that flush
is never written (its history row is): at high rates most tasks never touch
the journal.

A row SQLite cannot take (a string that is not UTF-8, a value of no SQL type) is
logged and skipped: the batch is written again one row at a time without it.
The writer task itself never dies of a bad row: a crash there would take the
orchestrator down with it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

FLUSH_INTERVAL: Final = 0.05
FLUSH_BATCH: Final = 500
RETENTION_EVERY: Final = 600.0

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS history (
    task_id TEXT PRIMARY KEY,
    user TEXT, capability TEXT, node TEXT, priority TEXT,
    submitted REAL, queue_ms REAL, run_ms REAL, total_ms REAL,
    outcome TEXT, error_code TEXT, attempts INTEGER,
    input_bytes INTEGER, output_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS history_submitted ON history (submitted);
CREATE TABLE IF NOT EXISTS active (
    task_id TEXT PRIMARY KEY,
    submitted REAL,
    doc TEXT
);
CREATE TABLE IF NOT EXISTS workflow_runs (
    run_id TEXT PRIMARY KEY,
    workflow TEXT, where_ TEXT, trigger TEXT,
    started REAL, duration_ms REAL,
    outcome TEXT, error_code TEXT, error TEXT,
    steps TEXT
);
CREATE INDEX IF NOT EXISTS workflow_runs_started ON workflow_runs (started);
"""

HISTORY_COLUMNS: Final = (
    "task_id",
    "user",
    "capability",
    "node",
    "priority",
    "submitted",
    "queue_ms",
    "run_ms",
    "total_ms",
    "outcome",
    "error_code",
    "attempts",
    "input_bytes",
    "output_bytes",
)
# History rows per INSERT statement.  One statement for many rows is ~30 % less
# CPU than executemany, and the sqlite3 module releases the GIL once per statement
# rather than once per row: fewer hand-overs with the event loop's thread.
# 64 x 14 = 896 parameters, under SQLite's oldest limit of 999.
HISTORY_ROWS_PER_INSERT: Final = 64


@functools.cache
def _history_insert(rows: int) -> str:
    one = "(" + ",".join("?" * len(HISTORY_COLUMNS)) + ")"
    return "INSERT OR REPLACE INTO history VALUES " + ",".join([one] * rows)


def _execute(db: sqlite3.Connection, sql: str, args: Any) -> None:
    """One statement; named parameters come as a 1-tuple holding the row's dict."""
    if isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], dict):
        db.execute(sql, args[0])
    else:
        db.execute(sql, args)


@dataclass(slots=True)
class _Batch:
    """What one flush writes, in one transaction."""

    ops: list[tuple[str, tuple[Any, ...]]]
    history: list[dict[str, Any]]
    removes: list[tuple[str]]
    adds: list[tuple[str, float, str]]

    @property
    def size(self) -> int:
        return len(self.ops) + len(self.history) + len(self.removes) + len(self.adds)


class Store:
    def __init__(self, path: Path, retention_days: float, max_rows: int) -> None:
        self.path = path
        self.retention_s = retention_days * 86400
        self.max_rows = max_rows
        self._db: sqlite3.Connection | None = None
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._history: list[dict[str, Any]] = []
        self._removes: list[tuple[str]] = []
        self._adds: dict[str, tuple[float, Callable[[], dict[str, Any]]]] = {}
        self._wake = asyncio.Event()
        self._last_retention = 0.0
        # Every use of the connection runs on this one thread, in order: a write
        # whose awaiting task was cancelled still finishes before close() runs
        # (closing under a running statement crashed the process).
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtor-store")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Prompts, results and who asked what: the daemon's alone (0600, and the WAL
        # and shared-memory files SQLite creates beside it inherit the main file's mode).
        self.path.touch(mode=0o600, exist_ok=True)
        os.chmod(self.path, 0o600)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db

    async def close(self) -> None:
        await self.flush()
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)
        self._thread.shutdown(wait=False)

    # ------------------------------------------------------------- writes

    def _queue(self, sql: str, args: tuple[Any, ...]) -> None:
        self._ops.append((sql, args))
        self._wake.set()

    def journal_add(
        self, task_id: str, submitted: float, doc: Callable[[], dict[str, Any]]
    ) -> None:
        """Journal an active task.  ``doc`` is called at the next flush, and only
        if the task is still active then: one that ends within its flush window
        never touches SQLite (nor is its document built)."""
        self._adds[task_id] = (submitted, doc)
        self._wake.set()

    def journal_remove(self, task_id: str) -> None:
        if self._adds.pop(task_id, None) is None:  # else: never written, nothing to delete
            self._removes.append((task_id,))
            self._wake.set()

    def record(self, row: dict[str, Any]) -> None:
        self._history.append(row)
        self._wake.set()

    def record_run(self, row: dict[str, Any]) -> None:
        """One finished workflow run (steps as JSON; see daemon.workflows.engine)."""
        self._queue(
            "INSERT OR REPLACE INTO workflow_runs VALUES "
            "(:run_id, :workflow, :where_, :trigger, :started, :duration_ms, :outcome,"
            " :error_code, :error, :steps)",
            (row,),
        )

    @property
    def pending(self) -> int:
        """Writes waiting for the next flush."""
        return len(self._ops) + len(self._history) + len(self._removes) + len(self._adds)

    async def run(self) -> None:
        """The writer: flush batches as they come (idle when nothing happens)."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_INTERVAL if self.pending < FLUSH_BATCH else 0)
            try:
                await self.flush()
            except Exception:  # never let one bad batch end the writer (and the process)
                log.exception("history flush failed; the writer goes on")

    async def flush(self) -> None:
        self._wake.clear()
        if not self.pending or self._db is None:
            return
        # Journal documents are built here, on the loop, for the tasks still active.
        adds = []
        for task_id, (submitted, doc) in self._adds.items():
            try:
                adds.append((task_id, submitted, json.dumps(doc(), separators=(",", ":"))))
            except (TypeError, ValueError, RecursionError) as exc:
                log.warning("task %s not journalled: its document is not JSON (%s)", task_id, exc)
        batch = _Batch(self._ops, self._history, self._removes, adds)
        self._ops, self._history, self._removes, self._adds = [], [], [], {}
        await self._call(self._apply, batch)

    def _apply(self, batch: _Batch) -> None:
        """One transaction per flush: deletes before inserts, so a task id that
        ended and was submitted again within one window stays journalled."""
        db = self._db
        if db is None:
            return
        try:
            db.execute("BEGIN")
            for sql, args in batch.ops:
                _execute(db, sql, args)
            history, step = batch.history, HISTORY_ROWS_PER_INSERT
            for start in range(0, len(history), step):
                chunk = history[start : start + step]
                db.execute(
                    _history_insert(len(chunk)),
                    [row[name] for row in chunk for name in HISTORY_COLUMNS],
                )
            if batch.removes:
                db.executemany("DELETE FROM active WHERE task_id = ?", batch.removes)
            if batch.adds:
                db.executemany("INSERT OR REPLACE INTO active VALUES (?, ?, ?)", batch.adds)
            db.execute("COMMIT")
        except Exception as exc:
            # Not only sqlite3.Error: a lone surrogate raises UnicodeEncodeError, a huge
            # int OverflowError, a value of no SQL type ProgrammingError, a missing column
            # KeyError.  Which row it was is found by writing them one by one.
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.warning("history batch refused (%s): writing it row by row", exc)
            self._apply_rows(db, batch)
        now = time.time()
        if now - self._last_retention > RETENTION_EVERY:
            self._last_retention = now
            try:
                self._retention(db, now)
            except sqlite3.Error:
                log.exception("history retention failed")

    def _apply_rows(self, db: sqlite3.Connection, batch: _Batch) -> None:
        """The batch again, each row on its own (autocommit): a bad one is skipped."""
        steps: list[tuple[str, Any]] = list(batch.ops)
        steps += [
            (_history_insert(1), [row.get(name) for name in HISTORY_COLUMNS])
            for row in batch.history
        ]
        steps += [("DELETE FROM active WHERE task_id = ?", r) for r in batch.removes]
        steps += [("INSERT OR REPLACE INTO active VALUES (?, ?, ?)", a) for a in batch.adds]
        for sql, args in steps:
            try:
                _execute(db, sql, args)
            except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
                log.warning("history row skipped (%s): %.200r", exc, args)

    def _retention(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM history WHERE submitted < ?", (now - self.retention_s,))
        db.execute("DELETE FROM workflow_runs WHERE started < ?", (now - self.retention_s,))
        (count,) = db.execute("SELECT COUNT(*) FROM history").fetchone()
        if count > self.max_rows:
            db.execute(
                "DELETE FROM history WHERE task_id IN (SELECT task_id FROM history "
                "ORDER BY submitted LIMIT ?)",
                (count - self.max_rows,),
            )

    # -------------------------------------------------------------- reads

    async def load_active(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            assert self._db is not None
            rows = self._db.execute("SELECT doc FROM active ORDER BY submitted").fetchall()
            return [json.loads(r[0]) for r in rows]

        return await self._call(read)

    async def history(
        self, limit: int = 50, user: str | None = None, capability: str | None = None
    ) -> list[dict[str, Any]]:
        await self.flush()

        def read() -> list[dict[str, Any]]:
            assert self._db is not None
            sql = "SELECT * FROM history"
            where, args = [], []
            if user:
                where.append("user = ?")
                args.append(user)
            if capability:
                where.append("capability = ?")
                args.append(capability)
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY submitted DESC LIMIT ?"
            cur = self._db.execute(sql, (*args, limit))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return await self._call(read)

    async def workflow_runs(
        self, limit: int = 20, workflow: str | None = None
    ) -> list[dict[str, Any]]:
        """Finished workflow runs, newest first (``steps`` decoded)."""
        await self.flush()

        def read() -> list[dict[str, Any]]:
            assert self._db is not None
            sql = "SELECT * FROM workflow_runs"
            args: list[Any] = []
            if workflow:
                sql += " WHERE workflow = ?"
                args.append(workflow)
            cur = self._db.execute(sql + " ORDER BY started DESC LIMIT ?", (*args, limit))
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            for r in rows:
                r["where"] = r.pop("where_")
                r["steps"] = json.loads(r["steps"] or "[]")
            return rows

        return await self._call(read)
