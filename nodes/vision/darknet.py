"""The ``darknet`` detector: a Darknet YOLO (v3/v4, tiny or not) on OpenCV's dnn.

The model is a folder with the ``.cfg``, the ``.weights`` and the class names
(file names from the manifest's ``extra``, else the only one of each kind).
Input: the image resized (not letterboxed, as Darknet trains) to ``input``
square, RGB, 0..1.  Each output row is ``cx, cy, w, h`` (normalised),
objectness, then one score per class (OpenCV already multiplies them by the
objectness); boxes are filtered with per-class NMS.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from nodes.vision.coco import canonical
from nodes.vision.config import DarknetConfig
from nodes.vision.detect import DetectorEnv, DetectorUnavailable, model_extra, model_file
from nodes.vision.images import Detection, Image

log = logging.getLogger(__name__)


def _pick(folder: Path, named: object, suffix: str) -> Path:
    if isinstance(named, str):
        path = folder / named
        if path.is_file():
            return path
        raise DetectorUnavailable(f"{folder}: no {named}")
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise DetectorUnavailable(f"{folder}: expected one *{suffix} file, found {len(found)}")
    return found[0]


class DarknetDetector:
    type_name = "darknet"

    def __init__(self, config: DarknetConfig, env: DetectorEnv) -> None:
        self.config = config
        self.env = env
        self.model: str | None = config.model if config.model_path is None else None
        self.labels: list[str] = []
        self.net: cv2.dnn.Net | None = None
        self._outputs: list[str] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        cfg = self.config
        folder = model_file(self.env.store, cfg.model, cfg.model_path)
        if not folder.is_dir():
            raise DetectorUnavailable(f"{folder} is not a folder (cfg, weights and names)")
        extra = model_extra(self.env.store, cfg.model, cfg.model_path)
        cfg_file = _pick(folder, extra.get("cfg"), ".cfg")
        weights = _pick(folder, extra.get("weights"), ".weights")
        names = _pick(folder, extra.get("names"), ".names")
        try:
            net = cv2.dnn.readNetFromDarknet(str(cfg_file), str(weights))
        except cv2.error as exc:
            raise DetectorUnavailable(f"OpenCV cannot load {weights}: {exc}") from exc
        labels = canonical([n for n in names.read_text().splitlines() if n.strip()])
        self._outputs = list(net.getUnconnectedOutLayersNames())
        self.labels = labels
        self.net = net
        log.info("darknet ready: %s, %d classes, input %d", weights, len(labels), cfg.input)

    def attrs(self) -> dict[str, Any]:
        return {"labels": self.labels, "input": [self.config.input, self.config.input]}

    def blob(self, img: Image) -> npt.NDArray[np.float32]:
        size = (self.config.input, self.config.input)
        return np.asarray(cv2.dnn.blobFromImage(img, 1 / 255, size, swapRB=True), np.float32)

    def infer(self, blob: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        assert self.net is not None, "load() first"
        with self._lock:
            self.net.setInput(blob)
            outs = self.net.forward(self._outputs)
        return np.concatenate([np.asarray(o, np.float32).reshape(-1, o.shape[-1]) for o in outs])

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        threshold = self.config.min_score if min_score is None else min_score
        rows = self.infer(self.blob(img))
        scores_all = rows[:, 5:]
        class_ids = scores_all.argmax(axis=1)
        scores = scores_all[np.arange(len(rows)), class_ids]
        keep = scores >= threshold
        if not keep.any():
            return []
        rows, scores, class_ids = rows[keep], scores[keep], class_ids[keep]
        h, w = img.shape[:2]
        x1 = (rows[:, 0] - rows[:, 2] / 2) * w
        y1 = (rows[:, 1] - rows[:, 3] / 2) * h
        rects = np.stack([x1, y1, rows[:, 2] * w, rows[:, 3] * h], axis=1)
        idx = cv2.dnn.NMSBoxesBatched(
            rects.tolist(), scores.tolist(), class_ids.tolist(), threshold, self.config.iou
        )
        out: list[Detection] = []
        for i in np.ravel(idx):
            x, y, bw, bh = rects[i]
            box = (
                float(np.clip(x, 0, w)),
                float(np.clip(y, 0, h)),
                float(np.clip(x + bw, 0, w)),
                float(np.clip(y + bh, 0, h)),
            )
            if box[2] > box[0] and box[3] > box[1] and int(class_ids[i]) < len(self.labels):
                out.append(Detection(self.labels[int(class_ids[i])], float(scores[i]), box))
        out.sort(key=lambda d: -d.score)
        return out
