"""Configuration of the vision node and its backends (one model per ``type``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from nodes.base import NodeConfigBase


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class YoloOnnxConfig(_Strict):
    """Any YOLOv8-format ONNX detector run by onnxruntime (letterbox + NMS here)."""

    type: Literal["yolo_onnx"] = "yolo_onnx"
    model: str = Field(
        default="yolov8n-fall",
        description="Model name in models/manifest.yaml (default: the optional fall detector).",
    )
    model_path: Path | None = Field(
        default=None, description="An .onnx file to use instead of a manifest model."
    )
    classes: list[str] | None = Field(
        default=None,
        description="Class names (default: manifest `extra.classes`, else ONNX metadata).",
    )
    min_score: float = Field(default=0.35, ge=0, le=1, description="Drop weaker boxes.")
    iou: float = Field(default=0.45, gt=0, le=1, description="NMS overlap threshold.")
    threads: int | None = Field(
        default=None, ge=1, description="onnxruntime intra-op threads (default: its own)."
    )


class HogConfig(_Strict):
    """OpenCV's built-in HOG + linear SVM people detector (no model file)."""

    type: Literal["hog"] = "hog"
    # The SVM margin of a window; OpenCV's pedestrian windows score about 0.3-2.
    # Below 0.75 upper-body portraits and textured objects show up as "people".
    min_score: float = Field(default=0.75, ge=0, description="Minimum SVM weight of a window.")
    scale: float = Field(default=1.05, gt=1, description="Image pyramid step.")
    max_width: int = Field(
        default=640, ge=64, description="Downscale wider images first (speed; HOG is slow)."
    )


class SsdTfConfig(_Strict):
    """A TensorFlow Object Detection API SSD frozen graph run by OpenCV's dnn module."""

    type: Literal["ssd_tf"] = "ssd_tf"
    model: str = Field(
        default="ssdlite-mobilenet-v2-person", description="Model name in models/manifest.yaml."
    )
    model_path: Path | None = Field(
        default=None, description="A frozen_inference_graph.pb to use instead of a manifest model."
    )
    classes: list[str] | None = Field(
        default=None, description="Class names, in the graph's order (default: the manifest's)."
    )
    min_score: float = Field(default=0.5, ge=0, le=1, description="Drop weaker boxes.")


class DarknetConfig(_Strict):
    """A Darknet YOLO (cfg + weights + names) run by OpenCV's dnn module."""

    type: Literal["darknet"] = "darknet"
    model: str = Field(
        default="yolov3-tiny-coco", description="Model name (a folder) in the manifest."
    )
    model_path: Path | None = Field(
        default=None, description="A folder holding the cfg, weights and names instead."
    )
    # 320 finds more on the photos tried than the cfg's 416 (and is faster).
    input: int = Field(default=320, ge=64, le=1024, multiple_of=32, description="Input side (px).")
    min_score: float = Field(default=0.25, ge=0, le=1, description="Drop weaker boxes.")
    iou: float = Field(default=0.45, gt=0, le=1, description="NMS overlap threshold.")


DetectBackendConfig = Annotated[
    YoloOnnxConfig | HogConfig | SsdTfConfig | DarknetConfig, Field(discriminator="type")
]


def default_detectors() -> list[DetectBackendConfig]:
    """Best first: the person detector, then COCO for every other label."""
    return [SsdTfConfig(), DarknetConfig()]


def _default_detect() -> list[DetectBackendConfig]:
    return [*default_detectors(), HogConfig()]


class FacesConfig(_Strict):
    """Faces with OpenCV's Haar cascade (shipped with opencv-python 4.x)."""

    cascade: str = Field(
        default="haarcascade_frontalface_default.xml",
        description="Cascade file name in cv2.data.haarcascades, or a path.",
    )
    min_neighbors: int = Field(default=5, ge=1, description="Higher: fewer, surer faces.")
    min_size: int = Field(default=30, ge=8, description="Smallest face side (pixels).")


class DescribeConfig(_Strict):
    """``vision.describe``: an image and a question to Claude (Messages API, image block)."""

    type: Literal["anthropic"] = "anthropic"
    model: str = Field(default="claude-haiku-4-5", description="Anthropic model id.")
    base_url: str | None = Field(
        default=None, description="API base URL (default: the SDK's; a proxy or test server)."
    )
    api_key_env: str = Field(
        default="ANTHROPIC_API_KEY", description="Environment variable holding the API key."
    )
    api_key_file: Path | None = Field(
        default=None, description="File holding the API key (used when the variable is unset)."
    )
    max_tokens: int = Field(default=300, ge=1, description="Default answer length cap.")
    timeout: float = Field(default=60.0, gt=0, description="Request timeout (s).")
    max_retries: int = Field(default=2, ge=0, description="SDK retries on 429 / 5xx.")


class ImagineConfig(_Strict):
    """``imagine``: image generation by an AUTOMATIC1111 web UI (``/sdapi/v1/txt2img``)."""

    type: Literal["automatic1111"] = "automatic1111"
    base_url: str = Field(description="The web UI, e.g. http://gpu-box:7860 (started --api).")
    steps: int = Field(default=20, ge=1, le=150, description="Default sampling steps.")
    width: int = Field(default=512, ge=64, le=2048, description="Default width.")
    height: int = Field(default=512, ge=64, le=2048, description="Default height.")
    timeout: float = Field(default=300.0, gt=0, description="Request timeout (s).")
    media_ttl: float = Field(
        default=3600.0, gt=0, description="Seconds the retained image stays on its media topic."
    )


class VisionConfig(NodeConfigBase):
    """``vision.detect``, ``vision.faces``, ``vision.describe`` and ``imagine``."""

    type: Literal["vision"] = "vision"
    detect: list[DetectBackendConfig] = Field(
        default_factory=_default_detect,
        description="Detection backends; each one that starts is advertised.",
    )
    faces: FacesConfig | None = Field(
        default_factory=FacesConfig, description="vision.faces (null: off)."
    )
    describe: DescribeConfig | None = Field(
        default=None, description="vision.describe (advertised when the API key is there)."
    )
    imagine: ImagineConfig | None = Field(
        default=None, description="imagine (advertised only when configured)."
    )
    models_dir: Path | None = Field(
        default=None, description="Models directory (default: $MTOR_MODELS_DIR or models/)."
    )
