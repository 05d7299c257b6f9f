"""The event history: every tracked object and review item of a node's cameras in SQLite.

One row per object (upserted on ``new``/``update``/``end``) and per review
item, with its snapshot and clip ids, so ``camera.events`` (``mtor history``)
can list and filter them by camera, label, zone and time.  Retention is
bounded: at most ``max_per_label`` objects per camera and label, at most
``max_per_camera`` objects per camera, nothing older than ``days``; the
oldest go first.  Blocking (sqlite3): the camera node calls it off the
event loop; one lock serialises the connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any, Final

from nodes.camera.config import HistoryConfig

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, camera TEXT NOT NULL, label TEXT NOT NULL,
    start_time REAL NOT NULL, end_time REAL, top_score REAL NOT NULL,
    zones TEXT NOT NULL, entered_zones TEXT NOT NULL, stationary INTEGER NOT NULL,
    verified INTEGER, snapshot_id TEXT, review_id TEXT, clip_id TEXT
);
CREATE INDEX IF NOT EXISTS objects_camera_label ON objects (camera, label, start_time);
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY, camera TEXT NOT NULL, severity TEXT NOT NULL,
    start_time REAL NOT NULL, end_time REAL, labels TEXT NOT NULL, objects TEXT NOT NULL,
    zones TEXT NOT NULL, snapshot_id TEXT, clip_id TEXT
);
CREATE INDEX IF NOT EXISTS reviews_camera ON reviews (camera, start_time);
"""
DAY: Final = 86400.0
MAX_LIST: Final = 1000  # rows one query returns at most


class EventStore:
    def __init__(self, config: HistoryConfig) -> None:
        assert config.db is not None
        self.config = config
        config.db.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(config.db), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def object(self, row: dict[str, Any], now: float) -> None:
        """Insert or update one object (the attrs of a ``vision/object`` event)."""
        values = (
            row["id"],
            row["camera"],
            row["label"],
            row["start_time"],
            row.get("end_time"),
            row.get("top_score", 0.0),
            json.dumps(row.get("zones", [])),
            json.dumps(row.get("entered_zones", [])),
            int(bool(row.get("stationary"))),
            None if row.get("verified") is None else int(bool(row["verified"])),
            row.get("snapshot_id"),
            row.get("review_id"),
            row.get("clip_id"),
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO objects VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE "
                "SET end_time=excluded.end_time, top_score=excluded.top_score, "
                "zones=excluded.zones, entered_zones=excluded.entered_zones, "
                "stationary=excluded.stationary, verified=excluded.verified, "
                "snapshot_id=excluded.snapshot_id, "
                "review_id=COALESCE(excluded.review_id, review_id), "
                "clip_id=COALESCE(excluded.clip_id, clip_id)",
                values,
            )
            self._prune(row["camera"], row["label"], now)

    def review(self, row: dict[str, Any], clip_id: str | None) -> None:
        values = (
            row["id"],
            row["camera"],
            row["severity"],
            row["start_time"],
            row.get("end_time"),
            json.dumps(row.get("labels", [])),
            json.dumps(row.get("objects", [])),
            json.dumps(row.get("zones", [])),
            row.get("snapshot_id"),
            clip_id,
        )
        with self._lock:
            self._db.execute(
                "INSERT INTO reviews VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE "
                "SET severity=excluded.severity, end_time=excluded.end_time, "
                "labels=excluded.labels, objects=excluded.objects, zones=excluded.zones, "
                "snapshot_id=excluded.snapshot_id, clip_id=COALESCE(excluded.clip_id, clip_id)",
                values,
            )
            self._db.execute(
                "DELETE FROM reviews WHERE start_time < ?", (row["start_time"] - self._age(),)
            )

    def _age(self) -> float:
        return self.config.days * DAY

    def _prune(self, camera: str, label: str, now: float) -> None:
        cfg = self.config
        self._db.execute("DELETE FROM objects WHERE start_time < ?", (now - self._age(),))
        self._db.execute(
            "DELETE FROM objects WHERE camera = ? AND label = ? AND id NOT IN (SELECT id FROM "
            "objects WHERE camera = ? AND label = ? ORDER BY start_time DESC LIMIT ?)",
            (camera, label, camera, label, cfg.max_per_label),
        )
        self._db.execute(
            "DELETE FROM objects WHERE camera = ? AND id NOT IN (SELECT id FROM objects "
            "WHERE camera = ? ORDER BY start_time DESC LIMIT ?)",
            (camera, camera, cfg.max_per_camera),
        )

    def query(
        self,
        *,
        kind: str = "objects",
        camera: str | None = None,
        label: str | None = None,
        zone: str | None = None,
        after: float | None = None,
        before: float | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Newest first; ``zone`` matches the zones an object entered (or a review's)."""
        table = "reviews" if kind == "reviews" else "objects"
        where: list[str] = []
        args: list[str | float] = []
        if camera is not None:
            where.append("camera = ?")
            args.append(camera)
        if label is not None and table == "objects":
            where.append("label = ?")
            args.append(label)
        if after is not None:
            where.append("start_time >= ?")
            args.append(after)
        if before is not None:
            where.append("start_time < ?")
            args.append(before)
        sql = f"SELECT * FROM {table}"  # one of two names, never input
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY start_time DESC"
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [c[0] for c in cur.description]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        out = []
        for row in rows:
            for key in ("zones", "entered_zones", "labels", "objects"):
                if key in row:
                    row[key] = json.loads(row[key])
            for key in ("stationary", "verified"):
                if row.get(key) is not None:
                    row[key] = bool(row[key])
            labels = row.get("labels") or [row.get("label")]
            if label is not None and label not in labels:
                continue
            zones: list[str] = row.get("entered_zones") or row.get("zones") or []
            if zone is not None and zone not in zones:
                continue
            out.append(row)
            if len(out) >= min(limit, MAX_LIST):
                break
        return out
