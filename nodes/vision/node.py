"""The vision node: ``vision.detect``, ``vision.faces``, ``vision.describe`` and ``imagine``.

Task inputs carry images as base64 JPEG/PNG (see :mod:`nodes.vision.images`
and docs/vision.md); boxes come back in pixels of the image sent.  Every
backend that fails to start is logged and not advertised.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from daemon import topics
from daemon.errors import MtorError, TaskError
from daemon.modelstore import ModelStore
from daemon.node import Node, NodeContext
from daemon.protocol.node import Capability
from daemon.worker import TaskRun, task_input
from nodes.vision.combined import DetectorSet
from nodes.vision.config import VisionConfig
from nodes.vision.detect import Detector, DetectorEnv, DetectorUnavailable, load_detector
from nodes.vision.images import MAX_IMAGE_B64, decode_b64, media_type

MAX_PROMPT = 4000


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DetectInput(_Input):
    image: str = Field(min_length=1, max_length=MAX_IMAGE_B64 + 64, description="Base64 JPEG/PNG.")
    min_score: float | None = Field(default=None, ge=0, le=100)
    labels: list[str] | None = Field(default=None, description="Keep only these labels.")
    backend: Literal["yolo_onnx", "hog", "ssd_tf", "darknet"] | None = None


class FacesInput(_Input):
    image: str = Field(min_length=1, max_length=MAX_IMAGE_B64 + 64)


class DescribeInput(_Input):
    image: str = Field(min_length=1, max_length=MAX_IMAGE_B64 + 64)
    question: str = Field(default="Describe this image.", min_length=1, max_length=MAX_PROMPT)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)


class ImagineInput(_Input):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    width: int | None = Field(default=None, ge=64, le=2048)
    height: int | None = Field(default=None, ge=64, le=2048)
    steps: int | None = Field(default=None, ge=1, le=150)
    seed: int | None = None


T = TypeVar("T", bound=BaseModel)


def parse(model: type[T], data: Any) -> T:
    return task_input(model, data)


class VisionNode(Node):
    type_name = "vision"
    config: VisionConfig

    def __init__(self, name: str, config: VisionConfig, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        self.detectors: list[Detector] = []
        self.faces: Any = None
        self.describer: Any = None
        self.imaginer: Any = None

    async def setup(self) -> None:
        errors: list[str] = []
        configured = self.config.models_dir or _models_dir(self.ctx)
        store = ModelStore.default(configured, dict(os.environ))
        env = DetectorEnv(store=store)
        for cfg in self.config.detect:
            try:
                self.detectors.append(await asyncio.to_thread(load_detector, cfg, env))
            except DetectorUnavailable as exc:
                self.log.warning("vision.detect backend %s unavailable: %s", cfg.type, exc)
                errors.append(str(exc))
        if self.config.faces is not None:
            from nodes.vision.faces import HaarFaces

            faces = HaarFaces(self.config.faces)
            try:
                await asyncio.to_thread(faces.load)
                self.faces = faces
            except DetectorUnavailable as exc:
                self.log.warning("vision.faces unavailable: %s", exc)
                errors.append(str(exc))
        if self.config.describe is not None:
            try:
                from nodes.vision.describe import AnthropicDescriber

                describer = AnthropicDescriber(self.config.describe)
                describer.start()
                self.describer = describer
            except (ImportError, DetectorUnavailable) as exc:
                self.log.warning("vision.describe unavailable: %s", exc)
                errors.append(str(exc))
        if self.config.imagine is not None:
            try:
                from nodes.vision.imagine import Automatic1111

                self.imaginer = Automatic1111(self.config.imagine)
            except ImportError as exc:
                self.log.warning("imagine unavailable: %s", exc)
                errors.append(str(exc))
        if not (self.detectors or self.faces or self.describer or self.imaginer):
            raise MtorError("no vision backend could start: " + "; ".join(errors))

    def capabilities(self) -> list[Capability]:
        caps = [
            Capability(
                name="vision.detect",
                node=self.name,
                backend=d.type_name,
                model=d.model,
                max_concurrency=1,
                attrs=d.attrs(),
            )
            for d in self.detectors
        ]
        if self.faces is not None:
            caps.append(
                Capability(
                    name="vision.faces", node=self.name, backend="haar", model=self.faces.model
                )
            )
        if self.describer is not None:
            caps.append(
                Capability(
                    name="vision.describe",
                    node=self.name,
                    backend="anthropic",
                    model=self.describer.model,
                    max_concurrency=4,
                    attrs={"remote": True},
                )
            )
        if self.imaginer is not None:
            caps.append(
                Capability(
                    name="imagine",
                    node=self.name,
                    backend="automatic1111",
                    attrs={"remote": True, "content_type": "image/png"},
                )
            )
        return caps

    async def close(self) -> None:
        """Drop the models and close the API clients (a restart sets them up again)."""
        remote = (self.describer, self.imaginer)
        self.detectors = []
        self.faces = self.describer = self.imaginer = None
        for backend in remote:
            if backend is not None:
                await backend.close()

    # ------------------------------------------------------------------ tasks

    async def execute(self, task: TaskRun) -> Any:
        if task.capability == "vision.detect":
            return await self._detect(task)
        if task.capability == "vision.faces":
            return await self._faces(task)
        if task.capability == "vision.describe":
            return await self._describe(task)
        if task.capability == "imagine":
            return await self._imagine(task)
        raise TaskError("unavailable", f"{self.name} does not do {task.capability!r}")

    def _detector(
        self, wanted: str | None, model: str | None, labels: list[str] | None = None
    ) -> Detector:
        if not wanted and not model and self.detectors:
            # No backend asked for: the best detector here for each label.
            return DetectorSet(self.detectors, labels)
        for d in self.detectors:
            if (not wanted or d.type_name == wanted) and (not model or d.model == model):
                return d
        raise TaskError("unavailable", f"no vision.detect backend {wanted or ''} here".strip())

    async def _detect(self, task: TaskRun) -> Any:
        inp = parse(DetectInput, task.input)
        detector = self._detector(
            inp.backend or task.constraints.get("backend"),
            task.constraints.get("model"),
            inp.labels,
        )
        started = time.perf_counter()
        img = await asyncio.to_thread(decode_b64, inp.image)
        found = await asyncio.to_thread(detector.detect, img, inp.min_score)
        if inp.labels is not None:
            found = [d for d in found if d.label in inp.labels]
        h, w = img.shape[:2]
        return {
            "detections": [d.to_json() for d in found],
            "width": w,
            "height": h,
            "backend": detector.type_name,
            "model": detector.model,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        }

    async def _faces(self, task: TaskRun) -> Any:
        if self.faces is None:
            raise TaskError("unavailable", "vision.faces is not available here")
        inp = parse(FacesInput, task.input)
        img = await asyncio.to_thread(decode_b64, inp.image)
        found = await asyncio.to_thread(self.faces.detect, img)
        h, w = img.shape[:2]
        return {"faces": [d.to_json() for d in found], "width": w, "height": h}

    async def _describe(self, task: TaskRun) -> Any:
        if self.describer is None:
            raise TaskError("unavailable", "vision.describe is not available here")
        inp = parse(DescribeInput, task.input)
        image = inp.image.partition(",")[2] if inp.image.startswith("data:") else inp.image
        img = await asyncio.to_thread(decode_b64, image)  # validates before paying for the API
        del img
        import base64

        head = base64.b64decode(image[:64] + "=" * (-len(image[:64]) % 4))
        return await self.describer.describe(
            image, media_type(head), inp.question, inp.max_tokens, task.remaining()
        )

    async def _imagine(self, task: TaskRun) -> Any:
        if self.imaginer is None:
            raise TaskError("unavailable", "imagine is not configured here")
        inp = parse(ImagineInput, task.input)
        params = inp.model_dump(exclude_none=True)
        png, seed = await self.imaginer.txt2img(params, task.remaining())
        try:
            stream = f"{self.name}/imagine/{task.task_id}"
            topic = topics.MEDIA.build(
                realm=self.ctx.realm, node_id=self.ctx.node_id, stream=stream
            )
        except ValueError as exc:
            raise TaskError("bad_input", f"task id unusable in a topic: {exc}") from exc
        content_type = media_type(png)
        # Retained so the requester can fetch it after the result, expiring so
        # generated images do not pile up on the broker (MQTT 5 message expiry).
        assert self.config.imagine is not None
        await self.ctx.bus.publish(
            topic,
            png,
            qos=1,
            retain=True,
            content_type=content_type,
            expiry=self.config.imagine.media_ttl,
        )
        return {"media_topic": topic, "content_type": content_type, "bytes": len(png), "seed": seed}


def _models_dir(ctx: NodeContext) -> Path | None:
    section = getattr(ctx.config, "models", None)
    value = getattr(section, "dir", None)
    return Path(value) if value else None
