"""One watched camera: capture → motion → detection on moving regions → tracked events.

The loop reads and runs motion off the event loop (one ``to_thread`` per
frame), publishes motion start/end, offers the moving region to a
:class:`~nodes.camera.backpressure.LatestSlot` (local detector or a realm
``vision.detect`` task), feeds results to the IoU tracker, publishes object
events, snapshots and counts, and applies the built-in alarm rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import cv2
import numpy as np

from daemon import topics
from daemon.errors import MtorError
from nodes.camera.archive import Archive
from nodes.camera.backpressure import LatestSlot
from nodes.camera.capture import CaptureError, FrameSource
from nodes.camera.config import CameraSpec
from nodes.camera.motion import Box, Debounce, MotionDetector, MotionFrame, region
from nodes.camera.review import ReviewItem, ReviewKind, ReviewTracker
from nodes.camera.snapshots import pixel_box, render
from nodes.camera.tracker import EventKind, IoUTracker, NBox, Track
from nodes.vision.detect import Detector, run_detector
from nodes.vision.images import Image, encode_jpeg_b64

if TYPE_CHECKING:
    from nodes.camera.node import CameraNode

log = logging.getLogger(__name__)

RECONNECT_INITIAL: Final = 1.0  # seconds before reopening a dropped source, doubling
RECONNECT_MAX: Final = 30.0
# Per-event media (thumbnails) stay retained this long (MQTT 5 message expiry).
EVENT_MEDIA_TTL: Final = 24 * 3600.0
ALARMED_MEMORY: Final = 1024  # object ids remembered as already alarmed
SWITCHES: Final = ("detect", "motion", "snapshots", "recordings")
STILL: Final = MotionFrame()


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_") or "object"


@dataclass(slots=True)
class Job:
    frame: Image
    region: Box
    wall: float  # time.time() when the frame was read
    mono: float


class Camera:
    def __init__(self, name: str, spec: CameraSpec, node: CameraNode) -> None:
        self.name = name
        self.spec = spec
        self.node = node
        self.ctx = node.ctx
        self.log = logging.getLogger(f"{node.log.name}.{name}")
        self.source = FrameSource(spec.source, loop=spec.loop)
        self.motion = MotionDetector(spec.motion, spec.zones)
        self.debounce = Debounce(spec.motion.start_frames, spec.motion.end_seconds)
        self.zone_debounce = {
            z: Debounce(spec.motion.start_frames, spec.motion.end_seconds) for z in spec.zones
        }
        self.tracker = IoUTracker(
            spec.tracking,
            self._zones_of,
            filters=spec.objects,
            loitering={n: z.loitering_time for n, z in spec.zones.items()},
            masked=self._masked,
        )
        self.review = ReviewTracker(spec.review, name)
        self.archive = Archive(name, self.ctx.publish_event)  # the node adds clips / history
        # Runtime switches (Home Assistant's, as Frigate's <camera>/detect/set): all on at start.
        self.switches = dict.fromkeys(SWITCHES, True)
        self._present: dict[str, bool] = {}
        self.detector: Detector | None = None  # set by the node when detection is local
        self.slot: LatestSlot[Job] = LatestSlot(spec.detect.max_inflight, self._detect_job)
        self.latest: Image | None = None
        self.size = (0, 0)
        self.connected: bool | None = None
        self.stale = 0
        self._applied = 0.0
        self._zones_seen: set[str] = set()
        self._peak = 0.0
        self._counts: dict[str, int] = {}
        self._last_alarm = -1e18
        self._alarmed: dict[str, None] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._zone_polys = {n: np.array(z.points, np.float32) for n, z in spec.zones.items()}
        self._masks = {
            label: [np.array(m.points, np.float32) for m in f.masks]
            for label, f in spec.objects.items()
            if f.masks
        }

    # ------------------------------------------------------------- topics

    def state_topic(self, name: str) -> str:
        return topics.EVENT.build(
            realm=self.ctx.realm, node_id=self.ctx.node_id, domain=self.name, name=name
        )

    def media_topic(self, stream: str) -> str:
        return topics.MEDIA.build(
            realm=self.ctx.realm, node_id=self.ctx.node_id, stream=f"{self.name}/{stream}"
        )

    @property
    def detecting(self) -> bool:
        d = self.spec.detect
        return d.where == "realm" or (d.where == "local" and self.detector is not None)

    def labels(self) -> list[str]:
        """Labels counted and shown as sensors."""
        if self.spec.detect.labels is not None:
            return list(self.spec.detect.labels)
        if self.detector is not None:
            return list(self.detector.labels)
        return list(self.spec.alarm.labels) if self.spec.alarm else []

    # --------------------------------------------------------------- loop

    async def run(self) -> None:
        delay = RECONNECT_INITIAL
        try:
            await self._publish_state("motion", False)
            for z in self.spec.zones:
                await self._publish_state(f"motion_{z}", False)
            await self._forget_old_labels()
            for label in self.labels():
                await self._publish_count(label, 0)
            for switch in SWITCHES:
                await self._publish_state(f"{switch}_enabled", self.switches[switch])
            while True:
                try:
                    await asyncio.to_thread(self.source.open)
                except CaptureError as exc:
                    if self.connected is not False:
                        self.log.warning("camera %s: %s (retrying)", self.name, exc)
                    await self._set_connected(False)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                delay = RECONNECT_INITIAL
                await self._set_connected(True)
                await self._frames()
                await self._quiet()
                await self._set_connected(False)
                if self.source.ended:
                    self.log.info("camera %s: end of %s", self.name, self.source.source)
                    await asyncio.Event().wait()
                self.log.warning("camera %s: stream dropped, reopening", self.name)
                await asyncio.sleep(delay)
        finally:
            await self.slot.close()
            for task in list(self._background):
                task.cancel()
            await asyncio.to_thread(self.source.close)
            await self.archive.close()

    def _step(self, due: float | None) -> tuple[Image | None, MotionFrame | None]:
        frame = self.source.read(due)
        if frame is None:
            return None, None
        mf = self.motion.process(frame)
        self.archive.feed(frame, time.time())
        return frame, mf

    async def _frames(self) -> None:
        interval = 1.0 / self.spec.fps
        due = time.monotonic()
        live = self.source.live
        while True:
            if not live:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            frame, mf = await asyncio.to_thread(self._step, due if live else None)
            if frame is None or mf is None:
                return
            wall, mono = time.time(), time.monotonic()
            due = max(due + interval, mono) if not live else mono + interval
            self.latest = frame
            self.size = (frame.shape[1], frame.shape[0])
            if not self.switches["motion"]:
                mf = STILL  # the model still learns the background; nothing moves
            await self._on_motion(mf, wall, mono)
            if self.detecting and self.switches["detect"]:
                # Where it moves, and where a known object should be looked at again
                # (one that stopped moving makes no motion, yet it is still there).
                boxes = list(mf.boxes) if mf.moving else []
                boxes += [pixel_box(t.box, self.size) for t in self.tracker.due_checks(wall)]
                if boxes:
                    d = self.spec.detect
                    box = region(boxes, self.size, d.pad, d.min_region)
                    self.slot.offer(Job(frame, box, wall, mono))
            ended = self.tracker.expire(wall)
            if ended:
                await self._publish_objects([("end", t) for t in ended], None)
            await self._publish_reviews(self.review.expire(wall))
            await self.archive.after_frame()

    async def _quiet(self) -> None:
        """The source is gone: motion ends, objects end."""
        now = time.time()
        if self.debounce.force_off() is not None:
            await self._motion_event(False, None, now)
        for zone, deb in self.zone_debounce.items():
            if deb.force_off() is not None:
                await self._motion_event(False, zone, now)
        ended = self.tracker.end_all(now)
        if ended:
            await self._publish_objects([("end", t) for t in ended], None)
        await self._publish_reviews(self.review.close(now))
        await self.archive.close()

    # ------------------------------------------------------------- motion

    async def _on_motion(self, mf: MotionFrame, wall: float, mono: float) -> None:
        if mf.moving:
            self._zones_seen |= mf.zones
            self._peak = max(self._peak, mf.area)
        state = self.debounce.update(mf.moving, mono)
        if state is not None:
            await self._motion_event(state, None, wall)
        for zone, deb in self.zone_debounce.items():
            zstate = deb.update(zone in mf.zones, mono)
            if zstate is not None:
                await self._motion_event(zstate, zone, wall)

    async def _motion_event(self, on: bool, zone: str | None, wall: float) -> None:
        zones = [zone] if zone else sorted(self._zones_seen)
        attrs = {"camera": self.name, "zone": zone, "zones": zones, "area": round(self._peak, 4)}
        await self.ctx.publish_event("vision", "motion", on, device_class="motion", attrs=attrs)
        await self._publish_state(f"motion_{zone}" if zone else "motion", on)
        if zone is None and not on:
            self._zones_seen = set()
            self._peak = 0.0

    async def _publish_state(self, name: str, value: bool | int) -> None:
        await self.ctx.publish_event(self.name, name, value, retain=True)

    async def _forget_old_labels(self) -> None:
        """Clear the retained count and presence of labels this camera counted in an
        earlier run and no longer does (their entities are gone from Home Assistant;
        the retained values must not stay on the broker).  The labels of the last run
        are kept in ``<state_dir>/camera-<name>-labels.json``."""
        path = self.ctx.state_dir / f"camera-{slug(self.name)}-labels.json"
        now = sorted({slug(label) for label in self.labels()})
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = []
        for old in sorted(set(before if isinstance(before, list) else []) - set(now)):
            if not isinstance(old, str) or not old:
                continue
            log.info("camera %s: clearing the retained %r count (label no longer counted)",
                     self.name, old)  # fmt: skip
            for name in (old, f"{old}_present"):
                await self.ctx.bus.publish(self.state_topic(name), b"", retain=True, wait=False)
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(now))

    async def _publish_count(self, label: str, n: int) -> None:
        self._counts[label] = n
        await self.ctx.publish_event(self.name, slug(label), n, retain=True)
        if self._present.get(label) is not (n > 0):
            self._present[label] = n > 0
            await self.ctx.publish_event(
                self.name, f"{slug(label)}_present", n > 0, device_class="occupancy", retain=True
            )

    async def set_switch(self, switch: str, on: bool) -> None:
        """Turn detection, motion, snapshots or recordings on or off (a Home Assistant switch)."""
        self.switches[switch] = on
        if switch == "recordings" and self.archive.recorder is not None:
            self.archive.recorder.enabled = on
        if switch == "motion" and not on:
            now = time.time()
            if self.debounce.force_off() is not None:
                await self._motion_event(False, None, now)
            for zone, deb in self.zone_debounce.items():
                if deb.force_off() is not None:
                    await self._motion_event(False, zone, now)
        self.log.info("camera %s: %s %s", self.name, switch, "on" if on else "off")
        await self._publish_state(f"{switch}_enabled", on)

    async def _set_connected(self, on: bool) -> None:
        if self.connected is not on:
            self.connected = on
            await self.ctx.publish_event(
                self.name, "connected", on, device_class="connectivity", retain=True
            )

    # ---------------------------------------------------------- detection

    def _zones_of(self, box: NBox) -> set[str]:
        """Zones holding the object's bottom centre (where it stands), as Frigate does."""
        if not self._zone_polys:
            return set()
        point = ((box[0] + box[2]) / 2, box[3])
        return {
            name
            for name, poly in self._zone_polys.items()
            if cv2.pointPolygonTest(poly, point, False) >= 0
        }

    def _masked(self, label: str, box: NBox) -> bool:
        """Whether the object stands (bottom centre) in one of its label's masks."""
        point = ((box[0] + box[2]) / 2, box[3])
        return any(cv2.pointPolygonTest(m, point, False) >= 0 for m in self._masks.get(label, ()))

    async def _detect_job(self, job: Job) -> None:
        x1, y1, x2, y2 = job.region
        crop = job.frame[y1:y2, x1:x2]
        d = self.spec.detect
        if d.where == "local":
            assert self.detector is not None
            found = [
                (f.label, f.score, f.box)
                for f in await run_detector(self.detector, crop, d.min_score)
            ]
        else:
            found = await self.node.remote_detect(self, crop)
        if job.wall < self._applied:
            self.stale += 1  # an older frame answered after a newer one
            return
        self._applied = job.wall
        w, h = self.size
        dets: list[tuple[str, float, NBox]] = []
        for label, score, (bx1, by1, bx2, by2) in found:
            if d.labels is not None and label not in d.labels:
                continue
            box = ((bx1 + x1) / w, (by1 + y1) / h, (bx2 + x1) / w, (by2 + y1) / h)
            nbox = (round(box[0], 4), round(box[1], 4), round(box[2], 4), round(box[3], 4))
            dets.append((label, score, nbox))
        looked = (x1 / w, y1 / h, x2 / w, y2 / h)
        events = self.tracker.update(dets, job.wall, looked)
        if events:
            await self._publish_objects(events, job)

    async def _publish_objects(
        self, events: list[tuple[EventKind, Track]], job: Job | None
    ) -> None:
        for kind, track in events:
            # The first snapshot when the object is announced, then each better frame.
            best = track.score >= track.top_score and track.score > track.snapshot_score
            if job is not None and (kind == "new" or (kind == "update" and best)):
                await self._snapshot(track, job.frame)
            attrs: dict[str, Any] = {
                "event": kind,
                "id": track.id,
                "camera": self.name,
                "label": track.label,
                "score": round(track.score, 4),
                "top_score": round(track.top_score, 4),
                "box": list(track.box),
                "zones": sorted(track.zones),
                "entered_zones": track.entered_zones,
                "start_time": track.start,
                "end_time": track.end,
                "stationary": track.stationary,
                "verified": track.verified,
                "snapshot_id": track.id if track.snapshot_score else None,
                "frame_time": job.wall if job is not None else None,
            }
            await self.ctx.publish_event("vision", "object", track.label, attrs=attrs)
            await self.archive.on_object(attrs, track)
            now = job.wall if job is not None else time.time()
            await self._publish_reviews(self.review.on_object(kind, track, now))
            if kind == "end":
                self._alarmed.pop(track.id, None)
            else:
                self._check_alarm(track, job)
        counts = self.tracker.counts()
        for label in set(counts) | set(self._counts):
            if counts.get(label, 0) != self._counts.get(label):
                await self._publish_count(label, counts.get(label, 0))

    async def _publish_reviews(self, events: list[tuple[ReviewKind, ReviewItem]]) -> None:
        for kind, item in events:
            attrs = item.to_attrs(kind)
            await self.archive.on_review(kind, item, attrs)
            await self.ctx.publish_event("vision", "review", item.severity, attrs=attrs)

    async def _snapshot(self, track: Track, frame: Image) -> None:
        if not self.switches["snapshots"]:
            return
        cfg = self.spec.snapshots
        snap, thumb = await asyncio.to_thread(render, frame, track.box, track.label, cfg)
        track.snapshot_score = track.score
        jpeg = "image/jpeg"
        await self.ctx.publish_media(f"{self.name}/snapshot", snap, jpeg, retain=True)
        await self.ctx.publish_media(
            f"{self.name}/{slug(track.label)}/snapshot", snap, jpeg, retain=True
        )
        if thumb is not None:
            await self.ctx.bus.publish(
                self.media_topic(f"events/{track.id}/thumbnail"),
                thumb,
                retain=True,
                content_type=jpeg,
                expiry=EVENT_MEDIA_TTL,
                wait=False,
            )
        store = self.node.snapshot_store(self)
        if store is not None:
            try:
                await asyncio.to_thread(store.save, self.name, track.id, snap)
            except OSError as exc:
                self.log.warning("cannot keep snapshot of %s: %s", track.id, exc)

    async def snapshot_now(self) -> dict[str, Any]:
        """Publish the current frame on ``<camera>/snapshot`` (the ``camera.snapshot`` task)."""
        frame = self.latest
        if frame is None:
            raise MtorError(f"camera {self.name} has no frame yet")
        snap, _ = await asyncio.to_thread(render, frame, None, None, self.spec.snapshots)
        topic = self.media_topic("snapshot")
        await self.ctx.bus.publish(topic, snap, retain=True, content_type="image/jpeg")
        return {
            "camera": self.name,
            "media_topic": topic,
            "content_type": "image/jpeg",
            "bytes": len(snap),
            "width": frame.shape[1],
            "height": frame.shape[0],
        }

    # -------------------------------------------------------------- alarm

    def _check_alarm(self, track: Track, job: Job | None) -> None:
        rule = self.spec.alarm
        if rule is None or track.label not in rule.labels or track.id in self._alarmed:
            return
        if rule.zones and not set(rule.zones) & track.zones:
            return
        if not self.node.armed:
            return
        now = time.monotonic()
        if now - self._last_alarm < rule.cooldown:
            self.node.alarms_suppressed += 1
            return
        previous, self._last_alarm = self._last_alarm, now
        self._alarmed[track.id] = None
        while len(self._alarmed) > ALARMED_MEMORY:
            self._alarmed.pop(next(iter(self._alarmed)))
        frame = job.frame if job is not None else self.latest
        task = asyncio.create_task(self._fire(track, frame, previous))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fire(self, track: Track, frame: Image | None, previous: float) -> None:
        rule = self.spec.alarm
        assert rule is not None
        verified: bool | None = None
        if rule.verify is not None and frame is not None:
            verified = await self.node.verify(self, track, frame, rule.verify)
            if self.tracker.verdict(track, verified, time.time()) is not None:
                await self._publish_objects([("update", track)], None)
            if verified is False or (verified is None and rule.verify.on_error == "drop"):
                self._last_alarm = previous  # not an alarm: the cooldown is not spent
                self.log.info("alarm for %s %s not confirmed (%s)", track.label, track.id, verified)
                return
        if not self.node.armed:
            self._last_alarm = previous
            return
        attrs = {
            "camera": self.name,
            "label": track.label,
            "id": track.id,
            "zones": sorted(track.zones),
            "score": round(track.top_score, 4),
            "armed": self.node.armed_value,
            "verified": verified,
            "snapshot_id": track.id if track.snapshot_score else None,
            "clip_id": self.archive.on_alarm(track),
        }
        self.node.alarms_fired += 1
        await self.ctx.publish_event("vision", "alarm", track.label, attrs=attrs)
        self.log.warning("ALARM: %s in %s (%s)", track.label, self.name, ", ".join(track.zones))

    def encode_region(self, frame: Image, box: NBox) -> str:
        """A padded crop of ``box`` as base64 JPEG (blocking)."""
        h, w = frame.shape[:2]
        bx1, by1, bx2, by2 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
        r = region(
            [(int(bx1), int(by1), int(bx2), int(by2))],
            (w, h),
            self.spec.detect.pad,
            self.spec.detect.min_region,
        )
        return encode_jpeg_b64(frame[r[1] : r[3], r[0] : r[2]])
