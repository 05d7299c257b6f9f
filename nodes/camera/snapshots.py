"""Snapshots: a JPEG of the frame (the object's box drawn), a best-frame thumbnail,
and optional on-disk retention with a size cap (oldest deleted first).

Blocking (encoding, file I/O): the camera node runs these off the event loop.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np

from nodes.camera.config import SnapshotConfig
from nodes.camera.tracker import NBox
from nodes.vision.images import Image, encode_jpeg

log = logging.getLogger(__name__)

BOX_COLOUR = (0, 255, 0)
THUMB_PAD = 0.15  # context kept around the object in its thumbnail


def pixel_box(box: NBox, size: tuple[int, int]) -> tuple[int, int, int, int]:
    w, h = size
    return int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)


def render(
    frame: Image, box: NBox | None, label: str | None, config: SnapshotConfig
) -> tuple[bytes, bytes | None]:
    """(snapshot JPEG, thumbnail JPEG of the box or None)."""
    h, w = frame.shape[:2]
    thumb = None
    if box is not None:
        x1, y1, x2, y2 = pixel_box(box, (w, h))
        px, py = int((x2 - x1) * THUMB_PAD), int((y2 - y1) * THUMB_PAD)
        crop = frame[max(0, y1 - py) : min(h, y2 + py), max(0, x1 - px) : min(w, x2 + px)]
        if crop.size:
            scale = config.thumbnail / max(crop.shape[:2])
            if scale < 1:
                size = (max(1, int(crop.shape[1] * scale)), max(1, int(crop.shape[0] * scale)))
                crop = np.asarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA), np.uint8)
            thumb = encode_jpeg(crop, config.quality)
        if config.boxes:
            frame = frame.copy()
            cv2.rectangle(frame, (x1, y1), (x2, y2), BOX_COLOUR, 2)
            if label:
                cv2.putText(
                    frame, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, BOX_COLOUR
                )
    return encode_jpeg(frame, config.quality), thumb


class SnapshotStore:
    """``<dir>/<camera>/<id>.jpg`` files whose total size stays under ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes

    def save(self, camera: str, snapshot_id: str, data: bytes) -> Path:
        folder = self.dir / camera
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{snapshot_id}.jpg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.prune()
        return path

    def prune(self) -> int:
        """Delete the oldest files until the total fits; the number deleted."""
        files = []
        for p in self.dir.glob("*/*.jpg"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        deleted = 0
        for _, size, p in sorted(files, key=lambda f: (f[0], f[2].name)):
            if total <= self.max_bytes:
                break
            try:
                p.unlink()
            except OSError as exc:
                log.warning("cannot delete old snapshot %s: %s", p, exc)
                continue
            total -= size
            deleted += 1
        return deleted
