"""Review items: a camera's overlapping objects grouped into one item to look at.

While one item is open on a camera, every object announced there joins it
(so a person and their dog crossing together are one item, one
notification).  An item has a severity: ``alert`` when an object of
``review.alerts.labels`` is in one of its required zones (any zone when none
are given), else ``detection`` (``review.detections``); objects that match
neither are not reviewed.  ``start`` is published once per item, ``update``
when it gains an object, a label, a zone or the alert severity, and ``end``
``end_seconds`` after its last object ended.  Pure computation, clock passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nodes.camera.config import ReviewConfig, SeverityConfig
from nodes.camera.tracker import EventKind, Track, new_id

ReviewKind = Literal["start", "update", "end"]
Severity = Literal["alert", "detection"]


@dataclass
class ReviewItem:
    id: str
    camera: str
    severity: Severity
    start: float
    objects: dict[str, str] = field(default_factory=dict)  # object id -> label
    labels: list[str] = field(default_factory=list)
    zones: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    last_active: float = 0.0
    end: float | None = None
    snapshot_id: str | None = None

    def to_attrs(self, kind: ReviewKind) -> dict[str, object]:
        return {
            "type": kind,
            "id": self.id,
            "camera": self.camera,
            "severity": self.severity,
            "labels": list(self.labels),
            "objects": list(self.objects),
            "zones": list(self.zones),
            "start_time": self.start,
            "end_time": self.end,
            "snapshot_id": self.snapshot_id,
        }


def _matches(rule: SeverityConfig, track: Track) -> bool:
    if rule.labels is not None and track.label not in rule.labels:
        return False
    return not rule.required_zones or bool(set(rule.required_zones) & track.zones)


class ReviewTracker:
    def __init__(self, config: ReviewConfig, camera: str) -> None:
        self.config = config
        self.camera = camera
        self.item: ReviewItem | None = None

    def severity(self, track: Track) -> Severity | None:
        if _matches(self.config.alerts, track):
            return "alert"
        if _matches(self.config.detections, track):
            return "detection"
        return None

    def on_object(
        self, kind: EventKind, track: Track, now: float
    ) -> list[tuple[ReviewKind, ReviewItem]]:
        """An object event; the review events it causes."""
        item = self.item
        if kind == "end":
            if item is not None and track.id in item.active:
                item.active.discard(track.id)
                item.last_active = now
            return []
        severity = self.severity(track)
        if severity is None and (item is None or track.id not in item.objects):
            return []
        if item is None:
            assert severity is not None
            item = self.item = ReviewItem(new_id(now), self.camera, severity, now)
            self._join(item, track, severity, now)
            return [("start", item)]
        return [("update", item)] if self._join(item, track, severity, now) else []

    def _join(self, item: ReviewItem, track: Track, severity: Severity | None, now: float) -> bool:
        """Add ``track`` to ``item``: whether anything a reviewer sees changed."""
        changed = False
        item.active.add(track.id)
        item.last_active = now
        if track.id not in item.objects:
            item.objects[track.id] = track.label
            changed = True
        if track.label not in item.labels:
            item.labels.append(track.label)
            changed = True
        for z in sorted(track.zones):
            if z not in item.zones:
                item.zones.append(z)
                changed = True
        if severity == "alert" and item.severity != "alert":
            item.severity = "alert"
            changed = True
        if item.snapshot_id is None and track.snapshot_score:
            item.snapshot_id = track.id
        return changed

    def expire(self, now: float) -> list[tuple[ReviewKind, ReviewItem]]:
        item = self.item
        if item is None or item.active or now - item.last_active < self.config.end_seconds:
            return []
        item.end = now
        self.item = None
        return [("end", item)]

    def close(self, now: float) -> list[tuple[ReviewKind, ReviewItem]]:
        """The camera is gone: an open item ends now."""
        item = self.item
        if item is None:
            return []
        item.active.clear()
        item.end = now
        self.item = None
        return [("end", item)]
