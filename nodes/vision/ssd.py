"""The ``ssd_tf`` detector: a TensorFlow Object Detection API SSD on OpenCV's dnn.

The frozen graph is read with a text graph description derived from the
graph and the model's pipeline settings at load (:mod:`nodes.vision.ssd_graph`);
OpenCV's ``DetectionOutput`` layer decodes the boxes and runs NMS.  Input:
the whole image resized to the model's input (300x300), RGB, ``x/127.5 - 1``.
Output rows: ``[image, class, score, x1, y1, x2, y2]``, normalised.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from nodes.vision.config import SsdTfConfig
from nodes.vision.detect import DetectorEnv, DetectorUnavailable, model_extra, model_file
from nodes.vision.images import Detection, Image
from nodes.vision.ssd_graph import GraphError, SsdSettings, derive

log = logging.getLogger(__name__)

SCALE: Final = 1 / 127.5  # MobileNet pre-processing: x / 127.5 - 1
MEAN: Final = (127.5, 127.5, 127.5)


def settings_from(extra: dict[str, Any]) -> SsdSettings:
    """Pipeline settings from a manifest entry's ``extra`` (defaults: ssdlite_mobilenet_v2)."""
    base = SsdSettings()
    size = extra.get("input") or [base.width, base.height]
    ratios = extra.get("aspect_ratios")
    return SsdSettings(
        width=int(size[0]),
        height=int(size[1]),
        num_layers=int(extra.get("num_layers", base.num_layers)),
        min_scale=float(extra.get("min_scale", base.min_scale)),
        max_scale=float(extra.get("max_scale", base.max_scale)),
        aspect_ratios=tuple(float(r) for r in ratios) if ratios else base.aspect_ratios,
        reduce_boxes_in_lowest_layer=bool(
            extra.get("reduce_boxes_in_lowest_layer", base.reduce_boxes_in_lowest_layer)
        ),
    )


class SsdTfDetector:
    type_name = "ssd_tf"

    def __init__(self, config: SsdTfConfig, env: DetectorEnv) -> None:
        self.config = config
        self.env = env
        self.model: str | None = config.model if config.model_path is None else None
        self.labels: list[str] = []
        self.net: cv2.dnn.Net | None = None
        self.settings = SsdSettings()
        self._lock = threading.Lock()

    def load(self) -> None:
        cfg = self.config
        path = model_file(self.env.store, cfg.model, cfg.model_path)
        extra = model_extra(self.env.store, cfg.model, cfg.model_path)
        self.settings = settings_from(extra)
        try:
            graph = derive(path, self.settings)
        except GraphError as exc:
            raise DetectorUnavailable(str(exc)) from exc
        labels = cfg.classes or [str(c) for c in extra.get("classes") or []]
        if len(labels) != graph.num_classes:
            raise DetectorUnavailable(
                f"{path}: the graph has {graph.num_classes} classes, the class list {len(labels)}"
            )
        with tempfile.TemporaryDirectory(prefix="mtor-ssd-") as tmp:
            text = Path(tmp) / "graph.pbtxt"
            text.write_text(graph.text)
            try:
                net = cv2.dnn.readNetFromTensorflow(str(path), str(text))
            except cv2.error as exc:
                raise DetectorUnavailable(f"OpenCV cannot load {path}: {exc}") from exc
        self.labels = labels
        self.net = net
        log.info("ssd_tf ready: %s, classes %s, anchors %s", path, labels, graph.anchors)

    def attrs(self) -> dict[str, Any]:
        return {"labels": self.labels, "input": [self.settings.width, self.settings.height]}

    def blob(self, img: Image) -> npt.NDArray[np.float32]:
        size = (self.settings.width, self.settings.height)
        return np.asarray(cv2.dnn.blobFromImage(img, SCALE, size, MEAN, swapRB=True), np.float32)

    def infer(self, blob: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        assert self.net is not None, "load() first"
        with self._lock:
            self.net.setInput(blob)
            out = self.net.forward()
        return np.asarray(out, np.float32).reshape(-1, 7)

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        threshold = self.config.min_score if min_score is None else min_score
        rows = self.infer(self.blob(img))
        h, w = img.shape[:2]
        out: list[Detection] = []
        for _, cls, score, x1, y1, x2, y2 in rows:
            index = int(cls) - 1  # 0 is the background
            if score < threshold or not 0 <= index < len(self.labels):
                continue
            box = (
                float(np.clip(x1, 0, 1) * w),
                float(np.clip(y1, 0, 1) * h),
                float(np.clip(x2, 0, 1) * w),
                float(np.clip(y2, 0, 1) * h),
            )
            if box[2] > box[0] and box[3] > box[1]:
                out.append(Detection(self.labels[index], float(score), box))
        out.sort(key=lambda d: -d.score)
        return out
