"""What a detector is: a small Protocol, a registry of backends, lazy imports.

Detectors are blocking (onnxruntime, OpenCV) and hold one lock each, so one
model runs one inference at a time; async callers use :func:`run_detector`,
which runs it off the event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon.errors import MtorError
from daemon.plugins import load_attr

if TYPE_CHECKING:
    from daemon.modelstore import ModelStore
    from nodes.vision.config import DetectBackendConfig
    from nodes.vision.images import Detection, Image


class DetectorUnavailable(MtorError):
    """The backend cannot run here: missing package or model file."""


class Detector(Protocol):
    """A way to find objects in an image; ``load`` raises :class:`DetectorUnavailable`."""

    type_name: str
    model: str | None
    labels: list[str]

    def load(self) -> None:
        """Load the model (blocking)."""
        ...

    def detect(self, img: Image, min_score: float | None = None) -> list[Detection]:
        """Boxes in pixel coordinates of ``img`` (blocking, thread-safe)."""
        ...

    def attrs(self) -> dict[str, Any]: ...


@dataclass
class DetectorEnv:
    """What a backend may use of its node: the model store."""

    store: ModelStore | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_MODULES: dict[str, str] = {
    "yolo_onnx": "nodes.vision.yolo:YoloOnnxDetector",
    "hog": "nodes.vision.hog:HogDetector",
    "ssd_tf": "nodes.vision.ssd:SsdTfDetector",
    "darknet": "nodes.vision.darknet:DarknetDetector",
}


def make_detector(config: DetectBackendConfig, env: DetectorEnv) -> Detector:
    """Instantiate a detector, importing its module (and package) lazily."""
    try:
        cls = load_attr(_MODULES[config.type])
    except ImportError as exc:
        raise DetectorUnavailable(
            f"{config.type}: missing package {exc.name or exc} (install the `vision` extra)"
        ) from exc
    detector: Detector = cls(config, env)
    return detector


def load_detector(config: DetectBackendConfig, env: DetectorEnv) -> Detector:
    """Make and load a detector (blocking); :class:`DetectorUnavailable` if it cannot run."""
    detector = make_detector(config, env)
    try:
        detector.load()
    except (OSError, MtorError) as exc:
        if isinstance(exc, DetectorUnavailable):
            raise
        raise DetectorUnavailable(f"{config.type}: {exc}") from exc
    return detector


async def run_detector(
    detector: Detector, img: Image, min_score: float | None = None
) -> list[Detection]:
    return await asyncio.to_thread(detector.detect, img, min_score)


def model_extra(store: ModelStore | None, name: str, path: Path | None) -> dict[str, Any]:
    """The manifest entry's ``extra`` settings ({} for an explicit path or an unknown model)."""
    if store is None or path is not None:
        return {}
    try:
        return dict(store.entry(name).extra)
    except MtorError:
        return {}


def model_file(store: ModelStore | None, name: str, path: Path | None) -> Path:
    """The model file (or folder): an explicit path, else the manifest model's installed one."""
    if path is not None:
        if not path.exists():
            raise DetectorUnavailable(f"model file {path} does not exist")
        return path
    if store is None:
        raise DetectorUnavailable(f"no model store to find model {name!r}")
    from daemon.modelstore import ModelError

    try:
        return store.path(name)
    except ModelError as exc:
        raise DetectorUnavailable(str(exc)) from exc
