"""The camera node: watches cameras, publishes motion / object / alarm events.

* Each camera runs its own loop (:mod:`nodes.camera.camera`).
* Detection is local (a detector loaded here) or through the realm
  (``vision.detect`` tasks on the best peer, bounded by the camera's
  ``max_inflight``; stale frames dropped).
* The realm's retained ``state/armed`` is honoured even when the
  orchestrator is away: the broker keeps it retained and this node keeps
  the last value it saw.
* Task ``camera.snapshot`` publishes the current frame of a camera.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from daemon import topics
from daemon.bus import Inbound
from daemon.entities import EntitySpec
from daemon.errors import MessageError, MtorError, TaskError
from daemon.messages import decode
from daemon.modelstore import ModelStore
from daemon.node import Node, NodeContext
from daemon.protocol.node import Capability
from daemon.protocol.state import RealmState
from daemon.protocol.task import Constraints
from daemon.worker import TaskRun
from nodes.camera.camera import Camera, slug
from nodes.camera.clips import ClipStore, Recorder
from nodes.camera.config import CameraConfig, VerifyConfig
from nodes.camera.history import EventStore
from nodes.camera.snapshots import SnapshotStore
from nodes.camera.tracker import Track
from nodes.vision.combined import DetectorSet
from nodes.vision.detect import Detector, DetectorEnv, DetectorUnavailable, load_detector
from nodes.vision.images import Image, encode_jpeg_b64

ARMED_KEY = "armed"
SWITCH_ICONS: Final = {
    "detect": "mdi:motion-sensor",
    "motion": "mdi:run-fast",
    "snapshots": "mdi:image-multiple",
    "recordings": "mdi:filmstrip-box-multiple",
}
MAX_CLIP_BYTES: Final = 32 * 1024 * 1024  # one clip on a media topic at most
DISARMED_VALUES = frozenset({"disarmed", "off", "false", "0", ""})


class SnapshotInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    camera: str


class EventsInput(BaseModel):
    """``camera.events``: the history, newest first."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["objects", "reviews"] = "objects"
    camera: str | None = Field(default=None, max_length=64)
    label: str | None = Field(default=None, max_length=64)
    zone: str | None = Field(default=None, max_length=64)
    after: float | None = None
    before: float | None = None
    limit: int = Field(default=50, ge=1, le=1000)


class ClipInput(BaseModel):
    """``camera.clip``: a finished clip by id (a review item's or an alarm's)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9]{1,12}\.[0-9]{1,9}-[0-9a-f]{1,32}$")


class CameraNode(Node):
    type_name = "camera"
    config: CameraConfig

    def __init__(self, name: str, config: CameraConfig, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        self.cameras = {n: Camera(n, spec, self) for n, spec in config.cameras.items()}
        self.armed_value: Any = config.armed_default
        self.client: Any = None  # daemon.client.RealmClient when a camera uses the realm
        self.alarms_fired = 0
        self.alarms_suppressed = 0
        self.remote_failures = 0
        self._stores: dict[str, SnapshotStore] = {}
        self._clip_stores: dict[str, ClipStore] = {}
        self.history: EventStore | None = None
        self._subscribed = False

    @property
    def armed(self) -> bool:
        value = self.armed_value
        if value is None or value is False:
            return False
        return str(value).strip().lower() not in DISARMED_VALUES

    async def _setup_archive(self) -> None:
        hist = self.config.history
        if hist.db is not None and self.history is None:
            try:
                self.history = await asyncio.to_thread(EventStore, hist)
            except (OSError, sqlite3.Error) as exc:
                self.log.warning("event history %s unavailable: %s", hist.db, exc)
        for cam in self.cameras.values():
            cam.archive.history = self.history
            clips = cam.spec.clips
            if clips.dir is not None and cam.archive.recorder is None:
                key = str(clips.dir)
                if key not in self._clip_stores:
                    self._clip_stores[key] = ClipStore(clips.dir, clips.max_bytes, clips.days)
                store = self._clip_stores[key]
                cam.archive.recorder = Recorder(cam.name, clips, store, cam.spec.fps)

    async def setup(self) -> None:
        await self._setup_archive()
        configured = self.config.models_dir or _models_dir(self.ctx)
        env = DetectorEnv(store=ModelStore.default(configured, dict(os.environ)))
        shared: dict[str, Detector | None] = {}
        for cam in self.cameras.values():
            d = cam.spec.detect
            if d.where != "local":
                continue
            loaded: list[Detector] = []
            for cfg in [d.backend] if d.backend is not None else d.detectors:
                key = cfg.model_dump_json()
                if key not in shared:
                    try:
                        shared[key] = await asyncio.to_thread(load_detector, cfg, env)
                    except DetectorUnavailable as exc:
                        self.log.warning(
                            "camera %s: detector %s unavailable: %s", cam.name, cfg.type, exc
                        )
                        shared[key] = None
                detector = shared[key]
                if detector is not None:
                    loaded.append(detector)
            best = DetectorSet(loaded, d.labels)
            if best.missing:
                self.log.warning(
                    "camera %s: no detector here knows %s", cam.name, ", ".join(best.missing)
                )
            if not best.plan:
                self.log.warning("camera %s: detection off (no detector for its labels)", cam.name)
                continue
            cam.detector = best
        needs_realm = any(
            c.spec.detect.where == "realm" or (c.spec.alarm and c.spec.alarm.verify)
            for c in self.cameras.values()
        )
        # The client and the subscription live as long as the node: a setup after a
        # restart must not stack a second handler on the same filters.
        if needs_realm and self.client is None:
            self.client = self.ctx.realm_client()
            await self.client.start()
        if not self._subscribed:
            self._subscribed = True
            armed = topics.STATE.build(realm=self.ctx.realm, key=ARMED_KEY)
            await self.ctx.bus.subscribe(armed, self._on_armed)

    async def close(self) -> None:
        """Drop the detectors (a restart loads them again); run() closed the sources."""
        for cam in self.cameras.values():
            cam.detector = None

    async def _on_armed(self, msg: Inbound) -> None:
        if not msg.payload:  # retained state cleared
            self.armed_value = self.config.armed_default
            return
        try:
            state = decode(msg.payload, RealmState)
        except MessageError as exc:
            self.log.warning("bad armed state on %s: %s (%s)", msg.topic, exc, msg.preview())
            return
        if state.value != self.armed_value:
            self.log.info("armed state: %s (by %s)", state.value, state.by or "?")
        self.armed_value = state.value

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for cam in self.cameras.values():
                tg.create_task(cam.run(), name=f"camera:{cam.name}")

    def capabilities(self) -> list[Capability]:
        extra = []
        if self.history is not None:
            extra.append(Capability(name="camera.events", node=self.name, max_concurrency=4))
        if self._clip_stores:
            extra.append(
                Capability(
                    name="camera.clip",
                    node=self.name,
                    max_concurrency=2,
                    attrs={"content_type": "video/mp4"},
                )
            )
        snapshot = [
            Capability(
                name="camera.snapshot",
                node=self.name,
                max_concurrency=4,
                attrs={
                    "cameras": {
                        c.name: {
                            "detect": c.spec.detect.where if c.detecting else "off",
                            "labels": c.labels(),
                            "detectors": c.detector.attrs().get("detectors", {})
                            if c.detector is not None
                            else {},
                            "zones": sorted(c.spec.zones),
                        }
                        for c in self.cameras.values()
                    }
                },
            )
        ]
        return extra + snapshot

    def entities(self) -> list[EntitySpec]:
        out: list[EntitySpec] = []
        for cam in self.cameras.values():
            n = cam.name
            out.append(
                EntitySpec(
                    "binary_sensor",
                    f"{n}_motion",
                    f"{n} motion",
                    state_topic=cam.state_topic("motion"),
                    device_class="motion",
                )
            )
            for zone in cam.spec.zones:
                out.append(
                    EntitySpec(
                        "binary_sensor",
                        f"{n}_{zone}_motion",
                        f"{n} {zone} motion",
                        state_topic=cam.state_topic(f"motion_{zone}"),
                        device_class="motion",
                    )
                )
            for label in cam.labels():
                out.append(
                    EntitySpec(
                        "sensor",
                        f"{n}_{slug(label)}_count",
                        f"{n} {label} count",
                        state_topic=cam.state_topic(slug(label)),
                        state_class="measurement",
                        icon="mdi:counter",
                    )
                )
                out.append(
                    EntitySpec(
                        "binary_sensor",
                        f"{n}_{slug(label)}_present",
                        f"{n} {label}",
                        state_topic=cam.state_topic(f"{slug(label)}_present"),
                        device_class="occupancy",
                    )
                )
            out.extend(self._switches(cam))
            out.append(
                EntitySpec(
                    "camera",
                    f"{n}_snapshot",
                    f"{n} snapshot",
                    state_topic=cam.media_topic("snapshot"),
                    value_key=None,
                    content_type="image/jpeg",
                )
            )
            out.append(
                EntitySpec(
                    "binary_sensor",
                    f"{n}_connected",
                    f"{n} connected",
                    state_topic=cam.state_topic("connected"),
                    device_class="connectivity",
                    diagnostic=True,
                )
            )
        return out

    def _switches(self, cam: Camera) -> list[EntitySpec]:
        """Detection, motion, snapshots (and recordings, with clips) on/off, as Frigate's."""
        names = ["detect", "motion", "snapshots"]
        out = []
        if cam.archive.recorder is not None:
            names.append("recordings")
            out.append(
                EntitySpec(
                    "sensor",
                    f"{cam.name}_clips_bytes",
                    f"{cam.name} clips disk use",
                    state_topic=cam.state_topic("clips_bytes"),
                    device_class="data_size",
                    unit="B",
                    state_class="measurement",
                    diagnostic=True,
                )
            )
        for switch in names:

            async def command(value: Any, cam: Camera = cam, switch: str = switch) -> None:
                await cam.set_switch(switch, bool(value))

            out.append(
                EntitySpec(
                    "switch",
                    f"{cam.name}_{switch}_enabled",  # {cam}_motion is the motion sensor
                    f"{cam.name} {switch}",
                    state_topic=cam.state_topic(f"{switch}_enabled"),
                    icon=SWITCH_ICONS[switch],
                    on_command=command,
                )
            )
        return out

    async def execute(self, task: TaskRun) -> Any:
        if task.capability == "camera.events":
            return await self._events(task)
        if task.capability == "camera.clip":
            return await self._clip(task)
        if task.capability != "camera.snapshot":
            raise TaskError("unavailable", f"{self.name} does not do {task.capability!r}")
        try:
            inp = SnapshotInput.model_validate(task.input)
        except ValueError as exc:
            raise TaskError("bad_input", 'give {"camera": NAME}') from exc
        cam = self.cameras.get(inp.camera)
        if cam is None:
            raise TaskError("not_found", f"no camera {inp.camera!r} here")
        try:
            return await cam.snapshot_now()
        except MtorError as exc:
            raise TaskError("unavailable", str(exc)) from exc

    async def _events(self, task: TaskRun) -> Any:
        if self.history is None:
            raise TaskError("unavailable", "no event history here (history.db is not set)")
        try:
            inp = EventsInput.model_validate(task.input)
        except ValueError as exc:
            raise TaskError("bad_input", f"camera.events: {exc}") from exc
        rows = await asyncio.to_thread(self.history.query, **inp.model_dump())
        return {"kind": inp.kind, "events": rows}

    async def _clip(self, task: TaskRun) -> Any:
        try:
            inp = ClipInput.model_validate(task.input)
        except ValueError as exc:
            raise TaskError("bad_input", 'give {"id": CLIP_ID} (a review or alarm id)') from exc
        path = next(
            (p for s in self._clip_stores.values() if (p := s.find(inp.id)) is not None), None
        )
        if path is None:
            raise TaskError("not_found", f"no clip {inp.id!r} here (still recording, or pruned)")
        data = await asyncio.to_thread(path.read_bytes)
        if len(data) > MAX_CLIP_BYTES:
            raise TaskError("bad_input", f"clip {inp.id} is {len(data)} bytes, over the media cap")
        camera = path.parent.name
        topic = topics.MEDIA.build(
            realm=self.ctx.realm, node_id=self.ctx.node_id, stream=f"{camera}/clips/{inp.id}"
        )
        await self.ctx.bus.publish(
            topic,
            data,
            qos=1,
            retain=True,
            content_type="video/mp4",
            expiry=self.config.media_ttl,
        )
        return {
            "id": inp.id,
            "camera": camera,
            "media_topic": topic,
            "content_type": "video/mp4",
            "bytes": len(data),
        }

    # ------------------------------------------------------------ helpers

    def snapshot_store(self, cam: Camera) -> SnapshotStore | None:
        cfg = cam.spec.snapshots
        if cfg.dir is None:
            return None
        key = str(cfg.dir)
        if key not in self._stores:
            self._stores[key] = SnapshotStore(cfg.dir, cfg.max_bytes)
        return self._stores[key]

    async def _call_detect(
        self,
        image: str,
        constraints: Constraints,
        timeout: float,
        min_score: float | None,
        labels: list[str] | None = None,
    ) -> dict[str, Any]:
        from daemon.client import TaskFailed

        assert self.client is not None
        inp: dict[str, Any] = {"image": image}
        if min_score is not None:
            inp["min_score"] = min_score
        if labels is not None:
            inp["labels"] = labels  # the peer runs only its best detector for these
        handle = await self.client.submit(
            "vision.detect",
            inp,
            priority="alarm",
            timeout=timeout,
            stream=False,
            constraints=constraints,
        )
        try:
            async with asyncio.timeout(timeout + 1.0):
                out: dict[str, Any] = await handle.result()
                return out
        except TimeoutError:
            await handle.cancel("camera gave up waiting")
            raise
        except TaskFailed:
            raise

    async def remote_detect(
        self, cam: Camera, crop: Image
    ) -> list[tuple[str, float, tuple[float, float, float, float]]]:
        """Detection of ``crop`` by a ``vision.detect`` peer (boxes in crop pixels)."""
        from daemon.client import TaskFailed

        d = cam.spec.detect
        b64 = await asyncio.to_thread(encode_jpeg_b64, crop)
        try:
            out = await self._call_detect(
                b64, Constraints(backend=d.realm_backend), d.timeout, d.min_score, d.labels
            )
        except (TaskFailed, TimeoutError, MtorError) as exc:
            self.remote_failures += 1
            self.log.warning("camera %s: realm detection failed: %s", cam.name, exc)
            return []
        # The peer saw the image we sent: it may have been downscaled to fit.
        sx = crop.shape[1] / max(1, int(out.get("width") or crop.shape[1]))
        sy = crop.shape[0] / max(1, int(out.get("height") or crop.shape[0]))
        found = []
        for det in out.get("detections", []):
            x1, y1, x2, y2 = (float(v) for v in det["box"])
            found.append(
                (str(det["label"]), float(det["score"]), (x1 * sx, y1 * sy, x2 * sx, y2 * sy))
            )
        return found

    async def verify(
        self, cam: Camera, track: Track, frame: Image, cfg: VerifyConfig
    ) -> bool | None:
        """Second pass by a stronger peer: True seen, False not seen, None no verdict."""
        from daemon.client import TaskFailed

        if self.client is None:
            return None
        b64 = await asyncio.to_thread(cam.encode_region, frame, track.box)
        constraints = Constraints(backend=cfg.backend, model=cfg.model, node=cfg.node)
        try:
            out = await self._call_detect(
                b64, constraints, cfg.timeout, cfg.min_score, [track.label]
            )
        except (TaskFailed, TimeoutError, MtorError) as exc:
            self.log.warning("camera %s: alarm verification failed: %s", cam.name, exc)
            return None
        return any(d.get("label") == track.label for d in out.get("detections", []))


def _models_dir(ctx: NodeContext) -> Path | None:
    section = getattr(ctx.config, "models", None)
    value = getattr(section, "dir", None)
    return Path(value) if value else None
