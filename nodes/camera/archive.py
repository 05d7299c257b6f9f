"""What one camera keeps: history rows (SQLite) and clips (MP4) of its events.

A narrow port between the camera loop and :mod:`nodes.camera.history` /
:mod:`nodes.camera.clips`: the camera tells it about object, review and
alarm events; it records them (off the event loop), opens and closes clips
(a review item's clip is named after the item; an alarm outside any item
gets its own, named after the object), and announces finished clips
(``vision/clip``) with the clip folder's disk use (``<camera>/clips_bytes``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nodes.camera.clips import Recorder
from nodes.camera.history import EventStore
from nodes.camera.review import ReviewItem, ReviewKind
from nodes.camera.tracker import Track

log = logging.getLogger(__name__)

Publish = Callable[..., Awaitable[None]]  # NodeContext.publish_event


class Archive:
    def __init__(
        self,
        camera: str,
        publish: Publish,
        recorder: Recorder | None = None,
        history: EventStore | None = None,
    ) -> None:
        self.camera = camera
        self.publish = publish
        self.recorder = recorder
        self.history = history
        self.review_id: str | None = None  # the open review item
        self._alarm_clips: set[str] = set()
        self.clips_done = 0

    @property
    def recording(self) -> bool:
        return self.recorder is not None and self.recorder.enabled

    def feed(self, frame: Any, wall: float) -> None:
        """In the camera's frame thread: the frame goes to the ring and open clips."""
        if self.recorder is not None:
            self.recorder.feed(frame, wall)

    async def on_object(self, attrs: dict[str, Any], track: Track) -> None:
        if self.history is not None:
            row = {**attrs, "review_id": self.review_id}
            await self._store(self.history.object, row, time.time())
        if track.end is not None and track.id in self._alarm_clips and self.recorder:
            self._alarm_clips.discard(track.id)
            self.recorder.stop(track.id, time.time())

    async def on_review(self, kind: ReviewKind, item: ReviewItem, attrs: dict[str, Any]) -> None:
        """Called before the review event goes out: sets its ``clip_id``."""
        now = time.time()
        clip = None
        if self.recorder is not None:
            if kind == "start":
                clip = item.id if self.recorder.start(item.id, item.start) else None
            else:
                clip = item.id if item.id in self.recorder.recording else None
            if kind == "end":
                self.recorder.stop(item.id, now)
        self.review_id = None if kind == "end" else item.id
        attrs["clip_id"] = clip
        if self.history is not None:
            await self._store(self.history.review, attrs, clip)

    def on_alarm(self, track: Track) -> str | None:
        """The clip showing an alarm: the open review item's, else one of its own."""
        if self.recorder is None:
            return None
        if self.review_id is not None and self.review_id in self.recorder.recording:
            return self.review_id
        if self.recorder.start(track.id, time.time()):
            self._alarm_clips.add(track.id)
            return track.id
        return None

    async def after_frame(self) -> None:
        """Announce the clips the frame thread finished."""
        if self.recorder is None:
            return
        done = self.recorder.drain()
        for clip_id in done:
            self.clips_done += 1
            path = self.recorder.store.path(self.camera, clip_id)
            size = path.stat().st_size if path.exists() else 0
            attrs = {"camera": self.camera, "id": clip_id, "bytes": size}
            await self.publish("vision", "clip", clip_id, attrs=attrs)
        if done:
            await self.publish_usage()

    async def publish_usage(self) -> None:
        if self.recorder is None:
            return
        used = await asyncio.to_thread(self.recorder.store.usage)
        await self.publish(self.camera, "clips_bytes", used, unit="B", retain=True)

    async def close(self) -> None:
        if self.recorder is not None:
            await asyncio.to_thread(self.recorder.close)
            await self.after_frame()

    async def _store(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            await asyncio.to_thread(fn, *args)
        except Exception as exc:  # sqlite3.Error, OSError: history is best effort
            log.warning("camera %s: cannot record history: %s", self.camera, exc)
