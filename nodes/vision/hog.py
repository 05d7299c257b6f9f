"""The ``hog`` detector: OpenCV's built-in HOG + linear SVM pedestrian detector.

No model file; finds upright, whole people about 64x128 pixels or larger
(it misses portraits and seated people).  Scores are SVM margins, not
probabilities.
"""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np

from nodes.vision.config import HogConfig
from nodes.vision.detect import DetectorEnv
from nodes.vision.images import Detection, Image


class HogDetector:
    type_name = "hog"
    model: str | None = None
    labels = ["person"]

    def __init__(self, config: HogConfig, env: DetectorEnv) -> None:
        self.config = config
        self._hog: cv2.HOGDescriptor | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        hog = cv2.HOGDescriptor()
        hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector(), np.float32))
        self._hog = hog

    def attrs(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        assert self._hog is not None, "load() first"
        threshold = self.config.min_score if min_score is None else min_score
        h, w = img.shape[:2]
        scale = min(1.0, self.config.max_width / w)
        small = img if scale >= 1.0 else cv2.resize(img, (int(w * scale), int(h * scale)))
        with self._lock:
            rects, weights = self._hog.detectMultiScale(
                small, winStride=(8, 8), padding=(8, 8), scale=self.config.scale
            )
        out: list[Detection] = []
        for (x, y, bw, bh), weight in zip(np.asarray(rects), np.ravel(weights), strict=False):
            if float(weight) < threshold:
                continue
            box = (x / scale, y / scale, (x + bw) / scale, (y + bh) / scale)
            out.append(Detection("person", float(weight), box))
        return out
