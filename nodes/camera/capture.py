"""Frames from a camera: a V4L2/USB device, an RTSP/HTTP stream, a video or image file.

Everything here blocks (OpenCV opens, grabs and decodes); the camera node
calls it with ``asyncio.to_thread``.  Live sources are paced by *grabbing*
(no decode) the frames that are not due, so a 30 fps camera watched at 5 fps
costs five decodes a second; files are paced by the caller's clock.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Final, Literal

import cv2
import numpy as np

from daemon.errors import MtorError
from nodes.vision.images import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
# How long OpenCV may take to open a stream before we call it down (ms).
OPEN_TIMEOUT_MS: Final = 10_000
READ_TIMEOUT_MS: Final = 10_000

SourceKind = Literal["device", "stream", "file", "image"]


class CaptureError(MtorError):
    """The source cannot be opened."""


def source_kind(source: str) -> SourceKind:
    if source.isdigit() or source.startswith("/dev/video"):
        return "device"
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        return "stream"
    if Path(source).suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "file"


class FrameSource:
    """One source; :meth:`open` it, :meth:`read` frames, :meth:`close` it.

    Each call runs in a worker thread; a lock keeps them apart: a camera that
    stops while a read is in progress (its task cancelled, the read's thread still
    in OpenCV) would otherwise release the capture under that read — a segfault.
    """

    def __init__(self, source: str, *, loop: bool = False) -> None:
        self.source = source
        self.kind = source_kind(source)
        self.loop = loop
        self.ended = False  # a file (not looping) reached its end
        self.frames = 0
        self._cap: cv2.VideoCapture | None = None
        self._image: Image | None = None
        self._lock = threading.Lock()

    @property
    def live(self) -> bool:
        return self.kind in ("device", "stream")

    def open(self) -> None:
        with self._lock:
            self._close()
            self._open()

    def _open(self) -> None:
        self.ended = False
        if self.kind == "image":
            img = cv2.imread(self.source, cv2.IMREAD_COLOR)
            if img is None:
                raise CaptureError(f"cannot read image {self.source}")
            self._image = np.asarray(img, np.uint8)
            return
        if self.kind == "device":
            index = int(self.source) if self.source.isdigit() else self.source
            cap = cv2.VideoCapture(index)
        elif self.kind == "stream":
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                OPEN_TIMEOUT_MS,
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                READ_TIMEOUT_MS,
            ]
            cap = cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params)
        else:
            if not Path(self.source).is_file():
                raise CaptureError(f"no such video file {self.source}")
            cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            cap.release()
            raise CaptureError(f"cannot open {self.kind} {self.source}")
        self._cap = cap

    def read(self, due: float | None = None) -> Image | None:
        """The next frame; None when the stream dropped or a file ended.

        A live source grabs (without decoding) until ``due`` (time.monotonic()).
        """
        with self._lock:
            return self._read(due)

    def _read(self, due: float | None) -> Image | None:
        if self._image is not None:
            self.frames += 1
            return self._image.copy()
        cap = self._cap
        if cap is None:
            return None
        if self.live and due is not None:
            while time.monotonic() < due:
                if not cap.grab():
                    return None
        ok, frame = cap.read()
        if not ok and self.kind == "file" and self.loop and self.frames:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = cap.read()
        if not ok or frame is None:
            if self.kind == "file":
                self.ended = True
            return None
        self.frames += 1
        return np.asarray(frame, np.uint8)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._image = None
