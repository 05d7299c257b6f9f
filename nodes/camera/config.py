"""Configuration of the camera node: cameras, zones, motion, detection, snapshots, alarm."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nodes.base import NodeConfigBase
from nodes.vision.config import DetectBackendConfig, default_detectors

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")
# Camera names become the domain of event topics; these are taken.
RESERVED = frozenset({"vision", "sensor", "node", "state"})

Point = tuple[float, float]
# Tracked by default (COCO names): people, vehicles and pets, as a porch camera wants.
DEFAULT_LABELS = ("person", "bicycle", "car", "motorcycle", "cat", "dog")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZoneConfig(_Strict):
    """A polygon of the picture, in normalised coordinates (0..1, origin top left)."""

    points: list[Point] = Field(min_length=3, description="[[x, y], ...] corners, 0..1.")
    loitering_time: float = Field(
        default=0.0,
        ge=0,
        description="Seconds an object must stay in the zone before it counts as in it "
        "(zones only; 0: at once).",
    )

    @field_validator("points")
    @classmethod
    def _inside(cls, points: list[Point]) -> list[Point]:
        for x, y in points:
            if not (0 <= x <= 1 and 0 <= y <= 1):
                raise ValueError(f"point ({x}, {y}) is outside 0..1")
        return points


class MotionConfig(_Strict):
    """Background subtraction (OpenCV MOG2) on a downscaled grey frame."""

    width: int = Field(default=320, ge=32, le=1920, description="Width the frame is scaled to.")
    threshold: int = Field(default=16, ge=1, le=255, description="MOG2 varThreshold.")
    history: int = Field(default=300, ge=10, description="MOG2 history (frames).")
    min_area: float = Field(
        default=0.002, gt=0, le=1, description="Smallest moving blob, as a fraction of the frame."
    )
    start_frames: int = Field(
        default=2, ge=1, description="Consecutive frames with motion before motion starts."
    )
    end_seconds: float = Field(
        default=2.0, ge=0, description="Seconds without motion before motion ends."
    )
    warmup_frames: int = Field(
        default=5, ge=0, description="Frames learned as background before motion counts."
    )
    masks: list[ZoneConfig] = Field(
        default_factory=list, description="Polygons ignored for motion (trees, a clock, ...)."
    )


class TrackingConfig(_Strict):
    """The IoU tracker that turns detections into object events."""

    iou: float = Field(default=0.3, gt=0, le=1, description="Overlap for the same object.")
    min_hits: int = Field(default=2, ge=1, description="Detections before an object is 'new'.")
    max_disappeared: float = Field(
        default=3.0, gt=0, description="Seconds unseen before an object 'end's."
    )
    update_interval: float = Field(
        default=1.0, ge=0, description="Least seconds between 'update' events of an object."
    )
    stationary_after: float = Field(
        default=10.0, gt=0, description="Seconds without moving before an object is stationary."
    )
    stationary_interval: float = Field(
        default=10.0,
        gt=0,
        description="A stationary object is looked for again this often (no motion needed).",
    )


class ObjectFilter(_Strict):
    """Which detections of one label count (Frigate's ``objects.filters``)."""

    min_area: float = Field(default=0.0, ge=0, le=1, description="Smallest box, frame fraction.")
    max_area: float = Field(default=1.0, gt=0, le=1, description="Largest box, frame fraction.")
    min_ratio: float = Field(default=0.0, ge=0, description="Smallest width / height.")
    max_ratio: float = Field(default=1e9, gt=0, description="Largest width / height.")
    min_score: float = Field(default=0.0, ge=0, le=1, description="Weaker detections are dropped.")
    threshold: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Median score over the first `median_frames` detections an object needs "
        "before it is announced.",
    )
    median_frames: int = Field(default=3, ge=1, le=30, description="Scores the median is over.")
    masks: list[ZoneConfig] = Field(
        default_factory=list,
        description="Object masks: a detection standing (bottom centre) in one is dropped "
        "(a statue, a poster, a parked car's place).",
    )


class SeverityConfig(_Strict):
    """Which objects make a review item of one severity."""

    labels: list[str] | None = Field(description="Labels (None: any label).")
    required_zones: list[str] = Field(
        default_factory=list, description="The object must be in one of these (empty: anywhere)."
    )


class ReviewConfig(_Strict):
    """Review items: overlapping activity on a camera grouped into one item."""

    alerts: SeverityConfig = Field(
        default_factory=lambda: SeverityConfig(labels=["person", "car"]),
        description="Objects that make an item an alert.",
    )
    detections: SeverityConfig = Field(
        default_factory=lambda: SeverityConfig(labels=None),
        description="Other objects that make (or join) an item of severity detection.",
    )
    end_seconds: float = Field(
        default=5.0, ge=0, description="The item ends this long after its last object ended."
    )


class DetectConfig(_Strict):
    """Object detection on the regions that move."""

    where: Literal["local", "realm", "off"] = Field(
        default="local",
        description="local: a detector in this node; realm: vision.detect tasks on the best peer.",
    )
    backend: DetectBackendConfig | None = Field(
        default=None,
        description="One local detector for every label (set: `detectors` is not used).",
    )
    detectors: list[DetectBackendConfig] = Field(
        default_factory=default_detectors,
        description="Local detectors, best first: each label goes to the first that knows it "
        "(default: the person detector, then COCO yolov3-tiny).",
    )
    realm_backend: str | None = Field(
        default=None, description="where: realm — ask for this backend (e.g. yolo_onnx)."
    )
    labels: list[str] | None = Field(
        default_factory=lambda: list(DEFAULT_LABELS),
        description="Labels tracked, COCO names (None: every label of the detectors).",
    )
    min_score: float | None = Field(default=None, ge=0, description="Override the backend's.")
    max_inflight: int = Field(
        default=1, ge=1, le=16, description="Detections in flight per camera (then frames wait)."
    )
    pad: float = Field(
        default=0.25, ge=0, le=2, description="Motion region padding (fraction of its size)."
    )
    min_region: int = Field(
        default=160, ge=32, description="Smallest side of the region sent to the detector (px)."
    )
    timeout: float = Field(default=5.0, gt=0, description="Seconds a realm detection may take.")


class SnapshotConfig(_Strict):
    """JPEG snapshots: retained on media topics, optionally kept on disk."""

    quality: int = Field(default=80, ge=10, le=100, description="JPEG quality.")
    thumbnail: int = Field(default=175, ge=32, description="Thumbnail longest side (px).")
    boxes: bool = Field(default=True, description="Draw the object's box on the snapshot.")
    dir: Path | None = Field(default=None, description="Keep snapshots here (None: not on disk).")
    max_bytes: int = Field(
        default=500_000_000, ge=1, description="Disk cap; the oldest files are deleted first."
    )


class ClipConfig(_Strict):
    """MP4 clips of each review item and alarm, with the seconds before it."""

    dir: Path | None = Field(default=None, description="Keep clips here (None: no clips).")
    pre_capture: float = Field(default=5.0, ge=0, le=60, description="Seconds before the event.")
    post_capture: float = Field(default=5.0, ge=0, le=300, description="Seconds after it ended.")
    max_seconds: float = Field(default=300.0, gt=0, description="Longest clip (seconds).")
    days: float = Field(default=7.0, gt=0, description="Clips older than this are deleted.")
    max_bytes: int = Field(
        default=2_000_000_000, ge=1, description="Disk cap; the oldest clips are deleted first."
    )


class HistoryConfig(_Strict):
    """The event history (SQLite): objects and review items, bounded."""

    db: Path | None = Field(default=None, description="SQLite file (None: no history).")
    max_per_label: int = Field(default=1000, ge=1, description="Objects kept per camera and label.")
    max_per_camera: int = Field(default=10000, ge=1, description="Objects kept per camera.")
    days: float = Field(default=30.0, gt=0, description="Older objects and items are deleted.")


class VerifyConfig(_Strict):
    """A second look by a stronger ``vision.detect`` peer before an alarm fires."""

    backend: str | None = Field(default=None, description="Backend constraint (e.g. yolo_onnx).")
    model: str | None = Field(default=None, description="Model constraint.")
    node: str | None = Field(default=None, description="Pin to this node id.")
    min_score: float | None = Field(default=None, ge=0, description="Score the peer must see.")
    timeout: float = Field(default=10.0, gt=0, description="Seconds to wait for the verdict.")
    on_error: Literal["alarm", "drop"] = Field(
        default="alarm", description="When no verdict comes: alarm anyway (unverified) or not."
    )


class AlarmConfig(_Strict):
    """The built-in rule: an object of these labels in these zones while armed."""

    labels: list[str] = Field(default_factory=lambda: ["person"], min_length=1)
    zones: list[str] = Field(
        default_factory=list,
        description="Required zones: the object must be in one (after the zone's "
        "loitering_time; empty: anywhere in the picture).",
    )
    cooldown: float = Field(default=60.0, ge=0, description="Least seconds between alarms.")
    verify: VerifyConfig | None = Field(default=None, description="Second pass (None: off).")


class CameraSpec(_Strict):
    """One camera: where frames come from and what to watch."""

    source: str = Field(
        description="Device index ('0'), /dev/video0, rtsp:// or http:// URL, video or image file."
    )
    fps: float = Field(default=5.0, gt=0, le=60, description="Frames processed per second.")
    loop: bool = Field(default=False, description="Restart a video file at its end (demos).")
    zones: dict[str, ZoneConfig] = Field(default_factory=dict, description="Named zones.")
    motion: MotionConfig = Field(default_factory=MotionConfig)
    detect: DetectConfig = Field(default_factory=DetectConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    clips: ClipConfig = Field(default_factory=ClipConfig)
    objects: dict[str, ObjectFilter] = Field(
        default_factory=dict, description="Per-label object filters (COCO names)."
    )
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    alarm: AlarmConfig | None = Field(default=None, description="Built-in alarm rule (None: off).")

    @field_validator("zones")
    @classmethod
    def _zone_names(cls, zones: dict[str, ZoneConfig]) -> dict[str, ZoneConfig]:
        for name in zones:
            if not NAME_RE.match(name):
                raise ValueError(f"zone name {name!r} must match {NAME_RE.pattern}")
        return zones

    @model_validator(mode="after")
    def _alarm_zones(self) -> CameraSpec:
        named = {
            "alarm": self.alarm.zones if self.alarm is not None else [],
            "review.alerts.required_zones": self.review.alerts.required_zones,
            "review.detections.required_zones": self.review.detections.required_zones,
        }
        for where, zones in named.items():
            unknown = set(zones) - set(self.zones)
            if unknown:
                raise ValueError(f"{where} zones {sorted(unknown)} are not defined in zones")
        return self


class CameraConfig(NodeConfigBase):
    """Cameras watched by one node: motion, detection, tracking, snapshots, alarms."""

    type: Literal["camera"] = "camera"
    cameras: dict[str, CameraSpec] = Field(min_length=1, description="Cameras by name.")
    armed_default: str = Field(
        default="disarmed",
        description="Armed state assumed until the retained state/armed is known.",
    )
    history: HistoryConfig = Field(default_factory=HistoryConfig)
    media_ttl: float = Field(
        default=3600.0, gt=0, description="Seconds a clip fetched with camera.clip stays retained."
    )
    models_dir: Path | None = Field(
        default=None, description="Models directory (default: $MTOR_MODELS_DIR or models/)."
    )

    @field_validator("cameras")
    @classmethod
    def _names(cls, cameras: dict[str, CameraSpec]) -> dict[str, CameraSpec]:
        for name in cameras:
            if not NAME_RE.match(name) or name in RESERVED:
                raise ValueError(
                    f"camera name {name!r} must match {NAME_RE.pattern} and not be one of "
                    f"{sorted(RESERVED)}"
                )
        return cameras
