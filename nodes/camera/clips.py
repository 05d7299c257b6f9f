"""Clips: an MP4 of each review item and alarm, with the seconds before it.

:class:`Recorder` keeps the last ``pre_capture`` seconds of a camera's
processed frames in a ring and, for each open clip, writes every frame to an
OpenCV ``VideoWriter`` (MPEG-4 Part 2, ``mp4v``, the codec every OpenCV
wheel can write) until ``post_capture`` seconds after the clip was stopped
(or ``max_seconds`` after it started).  :meth:`Recorder.feed` runs in the
camera's frame thread (off the event loop, beside capture and motion);
:meth:`Recorder.start` / :meth:`Recorder.stop` only record a wish under the
lock, so the loop never waits for encoding.  Finished clips are
``<dir>/<camera>/<id>.mp4``; the oldest are deleted past ``days`` or when the
folder exceeds ``max_bytes``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cv2

from nodes.camera.config import ClipConfig
from nodes.vision.images import Image

log = logging.getLogger(__name__)

FOURCC: Final = "mp4v"
DAY: Final = 86400.0


@dataclass
class _Clip:
    id: str
    path: Path
    started: float
    stop_at: float | None = None
    writer: cv2.VideoWriter | None = None
    frames: int = 0


class ClipStore:
    """``<dir>/<camera>/<id>.mp4`` files kept under ``max_bytes`` and ``days``."""

    def __init__(self, directory: Path, max_bytes: int, days: float) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.days = days

    def path(self, camera: str, clip_id: str) -> Path:
        return self.dir / camera / f"{clip_id}.mp4"

    def find(self, clip_id: str) -> Path | None:
        """A finished clip by id on any camera (ids are unguessable and unique)."""
        if not clip_id or "/" in clip_id or clip_id.startswith("."):
            return None
        for p in self.dir.glob(f"*/{clip_id}.mp4"):
            return p
        return None

    def files(self) -> list[Path]:
        """Finished clips (a clip being written is ``<id>.part.mp4``)."""
        return [p for p in self.dir.glob("*/*.mp4") if not p.name.endswith(".part.mp4")]

    def usage(self) -> int:
        total = 0
        for p in self.files():
            try:
                total += p.stat().st_size
            except OSError:
                continue
        return total

    def prune(self, now: float) -> int:
        """Delete clips older than ``days``, then the oldest past ``max_bytes``."""
        files = []
        for p in self.files():
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort(key=lambda f: (f[0], f[2].name))
        total = sum(size for _, size, _ in files)
        deleted = 0
        for mtime, size, p in files:
            if total <= self.max_bytes and now - mtime <= self.days * DAY:
                continue
            try:
                p.unlink()
            except OSError as exc:
                log.warning("cannot delete old clip %s: %s", p, exc)
                continue
            total -= size
            deleted += 1
        return deleted


class Recorder:
    def __init__(self, camera: str, config: ClipConfig, store: ClipStore, fps: float) -> None:
        self.camera = camera
        self.config = config
        self.store = store
        self.fps = fps
        self.enabled = True
        self._ring: deque[tuple[float, Image]] = deque(maxlen=max(1, int(config.pre_capture * fps)))
        self._clips: dict[str, _Clip] = {}
        self._lock = threading.Lock()
        self.finished: list[str] = []  # ids written completely (drained by the camera)
        self.failed = 0

    # ----------------------------------------------------- event loop side

    def start(self, clip_id: str, now: float) -> bool:
        """Begin a clip (its first frames are the ring's); False when recording is off."""
        if not self.enabled:
            return False
        with self._lock:
            if clip_id not in self._clips:
                self._clips[clip_id] = _Clip(clip_id, self.store.path(self.camera, clip_id), now)
        return True

    def stop(self, clip_id: str, now: float) -> None:
        """End a clip ``post_capture`` seconds from now."""
        with self._lock:
            clip = self._clips.get(clip_id)
            if clip is not None and clip.stop_at is None:
                clip.stop_at = now + self.config.post_capture

    @property
    def recording(self) -> list[str]:
        with self._lock:
            return list(self._clips)

    # ---------------------------------------------------- frame thread side

    def feed(self, frame: Image, wall: float) -> None:
        """One processed frame: into the ring and every open clip (blocking)."""
        with self._lock:
            clips = list(self._clips.values())
            ring = list(self._ring) if any(c.writer is None for c in clips) else []
            self._ring.append((wall, frame))
        done = []
        for clip in clips:
            if clip.writer is None and not self._open(clip, frame, ring):
                done.append(clip)
                continue
            assert clip.writer is not None
            clip.writer.write(frame)
            clip.frames += 1
            limit = clip.started + self.config.max_seconds
            if (clip.stop_at is not None and wall >= clip.stop_at) or wall >= limit:
                done.append(clip)
        for clip in done:
            self._finish(clip)

    def _open(self, clip: _Clip, frame: Image, ring: list[tuple[float, Image]]) -> bool:
        h, w = frame.shape[:2]
        clip.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = clip.path.with_suffix(".part.mp4")
        fourcc = cv2.VideoWriter.fourcc(*FOURCC)
        writer = cv2.VideoWriter(str(tmp), fourcc, self.fps, (w, h))
        if not writer.isOpened():
            self.failed += 1
            log.warning("camera %s: cannot write clip %s", self.camera, tmp)
            return False
        clip.writer = writer
        for _, old in ring:  # the seconds before the event
            if old.shape == frame.shape:
                writer.write(old)
                clip.frames += 1
        return True

    def _finish(self, clip: _Clip) -> None:
        with self._lock:
            self._clips.pop(clip.id, None)
        if clip.writer is None:
            return
        clip.writer.release()
        tmp = clip.path.with_suffix(".part.mp4")
        try:
            os.replace(tmp, clip.path)
        except OSError as exc:
            self.failed += 1
            log.warning("camera %s: cannot keep clip %s: %s", self.camera, clip.path, exc)
            return
        self.store.prune(time.time())
        with self._lock:
            self.finished.append(clip.id)

    def close(self) -> None:
        """The source is gone: finish every open clip now (blocking)."""
        with self._lock:
            clips = list(self._clips.values())
        for clip in clips:
            self._finish(clip)

    def drain(self) -> list[str]:
        with self._lock:
            out, self.finished = self.finished, []
        return out
