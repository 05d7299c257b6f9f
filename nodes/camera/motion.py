"""Motion: OpenCV MOG2 background subtraction on a downscaled grey frame.

Zones and masks are polygons in normalised coordinates, rasterised once at the
motion resolution.  :class:`MotionDetector` is pure computation (blocking,
one per camera); :class:`Debounce` turns per-frame motion into start/end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from nodes.camera.config import MotionConfig, Point, ZoneConfig
from nodes.vision.images import Image

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in full-frame pixels
Mask = npt.NDArray[np.uint8]


@dataclass(slots=True)
class MotionFrame:
    moving: bool = False
    area: float = 0.0  # fraction of the (unmasked) picture that changed
    boxes: list[Box] = field(default_factory=list)
    zones: set[str] = field(default_factory=set)


def polygon_mask(points: list[Point], width: int, height: int) -> Mask:
    mask = np.zeros((height, width), np.uint8)
    pts = np.array([[x * width, y * height] for x, y in points], np.int32)
    cv2.fillPoly(mask, [pts], 255)
    return mask


class MotionDetector:
    """One camera's background model."""

    def __init__(self, config: MotionConfig, zones: dict[str, ZoneConfig]) -> None:
        self.config = config
        self.zone_specs = zones
        self.frames = 0
        self._size: tuple[int, int] | None = None  # motion width, height
        self._scale = 1.0
        self._keep: Mask | None = None
        self._zones: dict[str, Mask] = {}
        self._kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        self._mog = cv2.createBackgroundSubtractorMOG2(
            history=config.history, varThreshold=config.threshold, detectShadows=False
        )

    def _init(self, frame: Image) -> None:
        h, w = frame.shape[:2]
        mw = min(self.config.width, w)
        mh = max(1, round(h * mw / w))
        self._size = (mw, mh)
        self._scale = w / mw
        if self.config.masks:
            keep = np.full((mh, mw), 255, np.uint8)
            for m in self.config.masks:
                keep[polygon_mask(m.points, mw, mh) > 0] = 0
            self._keep = keep
        self._zones = {n: polygon_mask(z.points, mw, mh) for n, z in self.zone_specs.items()}

    def process(self, frame: Image) -> MotionFrame:
        if self._size is None:
            self._init(frame)
        assert self._size is not None
        mw, mh = self._size
        small = cv2.resize(frame, self._size, interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        fg = self._mog.apply(gray)
        self.frames += 1
        if self.frames <= self.config.warmup_frames:
            return MotionFrame()
        if self._keep is not None:
            fg = cv2.bitwise_and(fg, self._keep)
        fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, self._kernel)
        changed = cv2.countNonZero(fg)
        min_px = self.config.min_area * mw * mh
        if changed < min_px:
            return MotionFrame(area=changed / (mw * mh))
        fg = cv2.dilate(fg, self._kernel, iterations=2)
        contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        s = self._scale
        boxes: list[Box] = []
        for c in contours:
            x, y, bw, bh = cv2.boundingRect(c)
            if bw * bh >= min_px:
                boxes.append((int(x * s), int(y * s), int((x + bw) * s), int((y + bh) * s)))
        if not boxes:
            return MotionFrame(area=changed / (mw * mh))
        zones = {
            name
            for name, zmask in self._zones.items()
            if cv2.countNonZero(cv2.bitwise_and(fg, zmask)) >= min_px
        }
        return MotionFrame(True, changed / (mw * mh), boxes, zones)


class Debounce:
    """On after ``start_frames`` consecutive moving frames, off after ``end_seconds`` still."""

    def __init__(self, start_frames: int, end_seconds: float) -> None:
        self.start_frames = start_frames
        self.end_seconds = end_seconds
        self.on = False
        self._run = 0
        self._last_seen = 0.0

    def update(self, moving: bool, now: float) -> bool | None:
        """The new state when it changes, else None."""
        if moving:
            self._run += 1
            self._last_seen = now
            if not self.on and self._run >= self.start_frames:
                self.on = True
                return True
            return None
        self._run = 0
        if self.on and now - self._last_seen >= self.end_seconds:
            self.on = False
            return False
        return None

    def force_off(self) -> bool | None:
        self._run = 0
        if self.on:
            self.on = False
            return False
        return None


def region(boxes: list[Box], size: tuple[int, int], pad: float, min_side: int) -> Box:
    """The union of ``boxes``, padded and grown to ``min_side``, inside the frame."""
    w, h = size
    x1 = min(b[0] for b in boxes)
    y1 = min(b[1] for b in boxes)
    x2 = max(b[2] for b in boxes)
    y2 = max(b[3] for b in boxes)
    px, py = (x2 - x1) * pad / 2, (y2 - y1) * pad / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w = max((x2 - x1) / 2 + px, min(min_side, w) / 2)
    half_h = max((y2 - y1) / 2 + py, min(min_side, h) / 2)
    nx1 = int(max(0, min(cx - half_w, w - 2 * half_w)))
    ny1 = int(max(0, min(cy - half_h, h - 2 * half_h)))
    return nx1, ny1, int(min(w, nx1 + 2 * half_w)), int(min(h, ny1 + 2 * half_h))
