"""A simple IoU tracker: detections of one camera become objects with a life.

Each detection is matched (greedily, same label, highest overlap first) to
the live object it overlaps most; an unmatched detection starts a new one.
An object is announced (``new``) after ``min_hits`` detections, reported
again (``update``) when its best score rises, its zones change or it moved
(at most every ``update_interval`` seconds), and ends when it has not been
seen for ``max_disappeared`` seconds.  Boxes are normalised (0..1).
Pure computation: no I/O, no clock of its own (``now`` is passed in).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from nodes.camera.config import TrackingConfig

NBox = tuple[float, float, float, float]  # x1, y1, x2, y2 in 0..1
EventKind = Literal["new", "update", "end"]
MOVED_IOU = 0.9  # below this overlap with the last reported box an object "moved"


def iou(a: NBox, b: NBox) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    id: str
    label: str
    box: NBox
    score: float
    start: float  # wall clock of the first detection
    last_seen: float
    top_score: float = 0.0
    hits: int = 1
    zones: set[str] = field(default_factory=set)
    entered_zones: list[str] = field(default_factory=list)
    reported: bool = False
    reported_box: NBox | None = None
    reported_zones: frozenset[str] = frozenset()
    reported_top: float = 0.0
    last_report: float = 0.0
    end: float | None = None
    snapshot_score: float = 0.0  # score of the frame its snapshot shows (0: none yet)

    def set_zones(self, zones: set[str]) -> None:
        self.zones = zones
        for z in sorted(zones):
            if z not in self.entered_zones:
                self.entered_zones.append(z)


def new_id(now: float) -> str:
    """Frigate-style event id: ``<unix time>-<random>``."""
    return f"{now:.6f}-{secrets.token_hex(3)}"


class IoUTracker:
    def __init__(self, config: TrackingConfig, zones_of: Callable[[NBox], set[str]]) -> None:
        self.config = config
        self.zones_of = zones_of
        self.tracks: list[Track] = []

    def update(
        self, detections: list[tuple[str, float, NBox]], now: float
    ) -> list[tuple[EventKind, Track]]:
        """Match one frame's detections; the events it causes."""
        events: list[tuple[EventKind, Track]] = []
        pairs = sorted(
            (
                (iou(t.box, d[2]), ti, di)
                for ti, t in enumerate(self.tracks)
                for di, d in enumerate(detections)
                if t.label == d[0]
            ),
            reverse=True,
        )
        used_t: set[int] = set()
        used_d: set[int] = set()
        for overlap, ti, di in pairs:
            if overlap < self.config.iou:
                break
            if ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            track = self.tracks[ti]
            _, score, box = detections[di]
            track.box, track.score, track.last_seen = box, score, now
            track.top_score = max(track.top_score, score)
            track.hits += 1
            track.set_zones(self.zones_of(box))
            kind = self._report_kind(track, now)
            if kind is not None:
                events.append((kind, track))
        for di, (label, score, box) in enumerate(detections):
            if di in used_d:
                continue
            track = Track(new_id(now), label, box, score, now, now, top_score=score)
            track.set_zones(self.zones_of(box))
            self.tracks.append(track)
            kind = self._report_kind(track, now)
            if kind is not None:
                events.append((kind, track))
        return events

    def _report_kind(self, track: Track, now: float) -> EventKind | None:
        if not track.reported:
            if track.hits < self.config.min_hits:
                return None
            kind: EventKind = "new"
        else:
            improved = track.top_score > track.reported_top
            zones_changed = frozenset(track.zones) != track.reported_zones
            moved = track.reported_box is None or iou(track.box, track.reported_box) < MOVED_IOU
            due = now - track.last_report >= self.config.update_interval
            if not (zones_changed or (due and (improved or moved))):
                return None
            kind = "update"
        track.reported = True
        track.reported_box = track.box
        track.reported_zones = frozenset(track.zones)
        track.reported_top = track.top_score
        track.last_report = now
        return kind

    def expire(self, now: float) -> list[Track]:
        """Objects not seen for ``max_disappeared`` seconds (reported ones end)."""
        gone = [t for t in self.tracks if now - t.last_seen > self.config.max_disappeared]
        if not gone:
            return []
        self.tracks = [t for t in self.tracks if t not in gone]
        for t in gone:
            t.end = now
        return [t for t in gone if t.reported]

    def end_all(self, now: float) -> list[Track]:
        gone, self.tracks = self.tracks, []
        for t in gone:
            t.end = now
        return [t for t in gone if t.reported]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tracks:
            if t.reported:
                out[t.label] = out.get(t.label, 0) + 1
        return out
