"""``vision.faces``: frontal faces with OpenCV's Haar cascade (shipped in cv2.data).

The score of a face is the number of overlapping raw detections that were
merged into it (a vote count, not a probability).
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from nodes.vision.config import FacesConfig
from nodes.vision.detect import DetectorUnavailable
from nodes.vision.images import Detection, Image


class HaarFaces:
    type_name = "haar"

    def __init__(self, config: FacesConfig) -> None:
        self.config = config
        self._cascade: cv2.CascadeClassifier | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        path = Path(self.config.cascade)
        if not path.is_file():
            path = Path(cv2.data.haarcascades) / self.config.cascade  # type: ignore[attr-defined]
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise DetectorUnavailable(f"cannot load Haar cascade {path}")
        self._cascade = cascade
        self.model = path.name

    def detect(self, img: Image) -> list[Detection]:
        assert self._cascade is not None, "load() first"
        gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        size = self.config.min_size
        with self._lock:
            rects, votes = self._cascade.detectMultiScale2(
                gray, scaleFactor=1.1, minNeighbors=self.config.min_neighbors, minSize=(size, size)
            )
        return [
            Detection("face", float(n), (float(x), float(y), float(x + w), float(y + h)))
            for (x, y, w, h), n in zip(np.asarray(rects), np.ravel(votes), strict=False)
        ]
