"""The ``yolo_onnx`` detector: any YOLOv8-format ONNX model on onnxruntime.

YOLOv8 exports (``yolo export format=onnx``) take ``[1, 3, H, W]`` RGB in
0..1 and give ``[1, 4 + classes, anchors]``: centre x, centre y, width,
height in input pixels, then one score per class (no objectness).  Images
are letterboxed (aspect kept, grey 114 padding, centred, as Ultralytics does),
boxes mapped back and filtered with per-class NMS.  Class names come from the
config, the manifest (``extra.classes``) or the model's own ``names`` metadata.
"""

from __future__ import annotations

import ast
import logging
import threading
from typing import Any, Final

import cv2
import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # type: ignore[import-untyped]

from daemon.errors import MtorError
from nodes.vision.config import YoloOnnxConfig
from nodes.vision.detect import DetectorEnv, DetectorUnavailable, model_file
from nodes.vision.images import Detection, Image

log = logging.getLogger(__name__)

DEFAULT_SIZE: Final = 640  # input side when the model's input shape is dynamic
PAD_VALUE: Final = 114


def letterbox(img: Image, width: int, height: int) -> tuple[Image, float, int, int]:
    """``img`` resized into ``width`` x ``height`` keeping its aspect: (canvas, scale, dx, dy)."""
    h, w = img.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = round(w * scale), round(h * scale)
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    dx, dy = (width - nw) // 2, (height - nh) // 2
    canvas = np.full((height, width, 3), PAD_VALUE, np.uint8)
    canvas[dy : dy + nh, dx : dx + nw] = resized
    return canvas, scale, dx, dy


def parse_names(text: str | None) -> list[str] | None:
    """Ultralytics metadata ``names`` (``"{0: 'person', 1: 'bicycle'}"``) as a list."""
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value)]
    if isinstance(value, list):
        return [str(v) for v in value]
    return None


class YoloOnnxDetector:
    type_name = "yolo_onnx"

    def __init__(self, config: YoloOnnxConfig, env: DetectorEnv) -> None:
        self.config = config
        self.env = env
        self.model: str | None = config.model if config.model_path is None else None
        self.labels: list[str] = []
        self._session: ort.InferenceSession | None = None
        self._input = ""
        self._size = (DEFAULT_SIZE, DEFAULT_SIZE)  # width, height
        self._dtype: type[np.floating[Any]] = np.float32
        self._lock = threading.Lock()

    def load(self) -> None:
        path = model_file(self.env.store, self.config.model, self.config.model_path)
        options = ort.SessionOptions()
        if self.config.threads:
            options.intra_op_num_threads = self.config.threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own non-exported types
            raise DetectorUnavailable(f"cannot load {path}: {exc}") from exc
        inp = session.get_inputs()[0]
        shape = inp.shape
        if len(shape) == 4 and isinstance(shape[2], int) and isinstance(shape[3], int):
            self._size = (shape[3], shape[2])
        self._dtype = np.float16 if "float16" in inp.type else np.float32
        self._input = inp.name
        out_shape = session.get_outputs()[0].shape
        labels = self.config.classes or self._manifest_classes()
        if not labels:
            meta = session.get_modelmeta().custom_metadata_map
            labels = parse_names(meta.get("names"))
        if not labels:
            raise DetectorUnavailable(f"{path}: no class names (config, manifest or metadata)")
        if isinstance(out_shape[1], int) and out_shape[1] != 4 + len(labels):
            raise DetectorUnavailable(
                f"{path}: output has {out_shape[1] - 4} classes, the class list {len(labels)}"
            )
        self.labels = labels
        self._session = session
        log.info("yolo_onnx ready: %s, %d classes, input %sx%s", path, len(labels), *self._size)

    def _manifest_classes(self) -> list[str] | None:
        store = self.env.store
        if store is None or self.config.model_path is not None:
            return None
        try:
            classes = store.entry(self.config.model).extra.get("classes")
        except MtorError:
            return None
        return [str(c) for c in classes] if isinstance(classes, list) else None

    def attrs(self) -> dict[str, Any]:
        return {"labels": self.labels, "input": list(self._size)}

    def preprocess(self, img: Image) -> tuple[npt.NDArray[Any], float, int, int]:
        canvas, scale, dx, dy = letterbox(img, *self._size)
        rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
        blob = rgb.transpose(2, 0, 1)[None].astype(self._dtype) / self._dtype(255.0)
        return blob, scale, dx, dy

    def infer(self, blob: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        assert self._session is not None, "load() first"
        with self._lock:
            out = self._session.run(None, {self._input: blob})[0]
        return np.asarray(out[0], dtype=np.float32)

    def postprocess(
        self,
        pred: npt.NDArray[np.float32],
        *,
        scale: float,
        dx: int,
        dy: int,
        size: tuple[int, int],
        min_score: float,
    ) -> list[Detection]:
        scores_all = pred[4:].T  # anchors x classes
        class_ids = scores_all.argmax(axis=1)
        scores = scores_all[np.arange(len(class_ids)), class_ids]
        keep = scores >= min_score
        if not keep.any():
            return []
        cx, cy, bw, bh = pred[:4, keep]
        scores, class_ids = scores[keep], class_ids[keep]
        x1 = (cx - bw / 2 - dx) / scale
        y1 = (cy - bh / 2 - dy) / scale
        ww, hh = bw / scale, bh / scale
        rects = np.stack([x1, y1, ww, hh], axis=1)
        idx = cv2.dnn.NMSBoxesBatched(
            rects.tolist(), scores.tolist(), class_ids.tolist(), min_score, self.config.iou
        )
        w, h = size
        out: list[Detection] = []
        for i in np.ravel(idx):
            x, y, rw, rh = rects[i]
            box = (
                float(np.clip(x, 0, w)),
                float(np.clip(y, 0, h)),
                float(np.clip(x + rw, 0, w)),
                float(np.clip(y + rh, 0, h)),
            )
            out.append(Detection(self.labels[int(class_ids[i])], float(scores[i]), box))
        out.sort(key=lambda d: -d.score)
        return out

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        threshold = self.config.min_score if min_score is None else min_score
        blob, scale, dx, dy = self.preprocess(img)
        pred = self.infer(blob)
        h, w = img.shape[:2]
        return self.postprocess(pred, scale=scale, dx=dx, dy=dy, size=(w, h), min_score=threshold)
