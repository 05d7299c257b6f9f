"""An IoU tracker: detections of one camera become objects with a life.

Each detection (after its label's filters: area, aspect ratio, score, masks) is
matched greedily, same label, highest overlap first, to a live object; an
unmatched detection starts a new one.  An object is announced (``new``) after
``min_hits`` detections once the median of its first scores reaches its
label's ``threshold``; reported again (``update``) when its best score rises,
its zones change, it moved (at most every ``update_interval`` seconds), it
becomes stationary or moves again, or a verdict arrives.

Absence is counted only where the detector looked: each update names the
region it covered, and an object ends when it was looked for and not found
for ``max_disappeared`` seconds (a stationary one: missed on looks spanning
``max_disappeared``, so one missed look does not end a parked car).  An
object nobody looked at is not gone (a parked car makes no motion);
:meth:`IoUTracker.due_checks` says which objects
should be looked at again (each second while it moves, every
``stationary_interval`` once stationary).  An object whose box has not moved
for ``stationary_after`` seconds is ``stationary``: it stays one object, with
no repeated ``new``.  A zone counts for an object once it has been in it for
the zone's ``loitering_time``.  Boxes are normalised (0..1).  Pure
computation: no I/O, no clock of its own (``now`` is passed in).
"""

from __future__ import annotations

import secrets
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from nodes.camera.config import ObjectFilter, TrackingConfig

NBox = tuple[float, float, float, float]  # x1, y1, x2, y2 in 0..1
EventKind = Literal["new", "update", "end"]
MOVED_IOU: Final = 0.9  # below this overlap with the last reported box an object "moved"
STILL_IOU: Final = 0.8  # at or above this overlap with its anchor box an object has not moved
RECHECK_INTERVAL: Final = 1.0  # seconds before an unseen moving object is looked for again
# Safety net: ended after this many stationary intervals unseen, looked for or not.
UNSEEN_INTERVALS: Final = 3
NO_FILTER: Final = ObjectFilter()


def iou(a: NBox, b: NBox) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_in(box: NBox, region: NBox | None) -> bool:
    if region is None:
        return True
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def passes(f: ObjectFilter, score: float, box: NBox) -> bool:
    """Whether one detection passes its label's filter (area, ratio, score)."""
    w, h = box[2] - box[0], box[3] - box[1]
    area = w * h
    ratio = w / h if h > 0 else 0.0
    return (
        score >= f.min_score
        and f.min_area <= area <= f.max_area
        and f.min_ratio <= ratio <= f.max_ratio
    )


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
    scores: list[float] = field(default_factory=list)  # the first few, for the median
    zones: set[str] = field(default_factory=set)  # zones it counts in (after loitering)
    entered_zones: list[str] = field(default_factory=list)
    zone_since: dict[str, float] = field(default_factory=dict)  # in the zone since
    last_checked: float = 0.0  # the detector last looked at its place (found or not)
    check_offered: float = 0.0  # a look at its place was last asked for
    missed_since: float | None = None  # looked for and not found since (None: seen last)
    anchor: NBox | None = None  # where it last moved
    moved_at: float = 0.0
    stationary: bool = False
    verified: bool | None = None  # a stronger peer's verdict (None: none yet)
    reported: bool = False
    reported_box: NBox | None = None
    reported_zones: frozenset[str] = frozenset()
    reported_top: float = 0.0
    reported_stationary: bool = False
    reported_verified: bool | None = None
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
    def __init__(
        self,
        config: TrackingConfig,
        zones_of: Callable[[NBox], set[str]],
        *,
        filters: Mapping[str, ObjectFilter] | None = None,
        loitering: Mapping[str, float] | None = None,
        masked: Callable[[str, NBox], bool] | None = None,
    ) -> None:
        self.config = config
        self.zones_of = zones_of
        self.masked = masked or (lambda _label, _box: False)
        self.filters = dict(filters or {})
        self.loitering = dict(loitering or {})
        self.tracks: list[Track] = []
        self.filtered = 0  # detections dropped by a filter

    def _filter(self, label: str) -> ObjectFilter:
        return self.filters.get(label, NO_FILTER)

    def update(
        self, detections: list[tuple[str, float, NBox]], now: float, region: NBox | None = None
    ) -> list[tuple[EventKind, Track]]:
        """Match one frame's detections, found by looking at ``region`` (None: the whole
        frame); the events it causes."""
        kept = [
            d
            for d in detections
            if passes(self._filter(d[0]), d[1], d[2]) and not self.masked(d[0], d[2])
        ]
        self.filtered += len(detections) - len(kept)
        detections = kept
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
            self._seen(track, score, box, now)
            kind = self._report_kind(track, now)
            if kind is not None:
                events.append((kind, track))
        for ti, track in enumerate(self.tracks):
            if ti not in used_t and centre_in(track.box, region):
                track.last_checked = now  # looked for, not found
                if track.missed_since is None:
                    track.missed_since = now
        for di, (label, score, box) in enumerate(detections):
            if di in used_d:
                continue
            track = Track(new_id(now), label, box, score, now, now, top_score=score)
            track.scores = [score]
            track.anchor, track.moved_at, track.last_checked = box, now, now
            self._set_zones(track, now)
            self.tracks.append(track)
            kind = self._report_kind(track, now)
            if kind is not None:
                events.append((kind, track))
        return events

    def _seen(self, track: Track, score: float, box: NBox, now: float) -> None:
        track.box, track.score, track.last_seen, track.last_checked = box, score, now, now
        track.missed_since = None
        track.top_score = max(track.top_score, score)
        track.hits += 1
        if len(track.scores) < self._filter(track.label).median_frames:
            track.scores.append(score)
        if track.anchor is None or iou(box, track.anchor) < STILL_IOU:
            track.anchor, track.moved_at, track.stationary = box, now, False
        elif now - track.moved_at >= self.config.stationary_after:
            track.stationary = True
        self._set_zones(track, now)

    def _set_zones(self, track: Track, now: float) -> None:
        inside = self.zones_of(track.box)
        track.zone_since = {z: track.zone_since.get(z, now) for z in inside}
        track.set_zones(
            {z for z, since in track.zone_since.items() if now - since >= self.loitering.get(z, 0)}
        )

    def _confident(self, track: Track) -> bool:
        f = self._filter(track.label)
        if f.threshold <= 0:
            return True
        if len(track.scores) < f.median_frames:
            return False
        return statistics.median(track.scores) >= f.threshold

    def _report_kind(self, track: Track, now: float) -> EventKind | None:
        if not track.reported:
            if track.hits < self.config.min_hits or not self._confident(track):
                return None
            kind: EventKind = "new"
        else:
            improved = track.top_score > track.reported_top
            zones_changed = frozenset(track.zones) != track.reported_zones
            flags = (
                track.stationary != track.reported_stationary
                or track.verified != track.reported_verified
            )
            moved = track.reported_box is None or iou(track.box, track.reported_box) < MOVED_IOU
            due = now - track.last_report >= self.config.update_interval
            if not (zones_changed or flags or (due and (improved or moved))):
                return None
            kind = "update"
        track.reported = True
        track.reported_box = track.box
        track.reported_zones = frozenset(track.zones)
        track.reported_top = track.top_score
        track.reported_stationary = track.stationary
        track.reported_verified = track.verified
        track.last_report = now
        return kind

    def verdict(self, track: Track, verified: bool | None, now: float) -> EventKind | None:
        """Record a second pass's verdict on ``track``; the event it causes."""
        track.verified = verified
        if track not in self.tracks or not track.reported:
            return None
        return self._report_kind(track, now)

    def due_checks(self, now: float) -> list[Track]:
        """Objects to look at again now (unseen for a while, or stationary); each is
        offered once per interval."""
        due = []
        for t in self.tracks:
            # A stationary object is looked at now and then, and soon again after a miss.
            slow = t.stationary and t.missed_since is None
            interval = self.config.stationary_interval if slow else RECHECK_INTERVAL
            if now - max(t.last_seen, t.last_checked, t.check_offered) >= interval:
                t.check_offered = now
                due.append(t)
        return due

    def expire(self, now: float) -> list[Track]:
        """Objects looked for and not found for ``max_disappeared`` seconds (or unseen for
        very long); the reported ones end."""
        limit = self.config.max_disappeared
        never = limit + UNSEEN_INTERVALS * self.config.stationary_interval
        gone = [t for t in self.tracks if self._gone(t, now, limit, never)]
        if not gone:
            return []
        self.tracks = [t for t in self.tracks if t not in gone]
        for t in gone:
            t.end = now
        return [t for t in gone if t.reported]

    @staticmethod
    def _gone(t: Track, now: float, limit: float, never: float) -> bool:
        if now - t.last_seen > never:
            return True
        if t.stationary:  # one missed look is not enough: missed for `limit` seconds
            return t.missed_since is not None and t.last_checked - t.missed_since >= limit
        return t.last_checked - t.last_seen > limit

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
