"""Timers, announcements and ``voice.listen``: the satellite's side that is not a turn.

* **Timers** (:class:`~nodes.voice.timers.Timers`): started, cancelled and
  asked about by voice; the running ones are the retained
  ``event/<node>/voice/timers`` state; a finished one is a
  ``voice/timer_finished`` event and is announced on the satellite that set it.
* **Announcements**: ``voice.announce`` (a task: ``{"text", "satellite"?,
  "area"?, "chime"?}``) and the "broadcast ..." intent publish a
  ``voice/broadcast`` event (``attrs.to_satellite`` / ``to_area`` / ``exclude``);
  every satellite listens to everyone's and speaks the ones addressed to it
  (all, its area, or its name) after a chime, behind any answer being spoken
  (``voice/announced`` when said).  Who asked is the event's topic: only a realm node
  can publish under ``event/<its id>/`` (the generated ACL), so no payload can
  make a satellite speak.
* ``voice.listen`` (a task, ``{"satellite"?}``): listen now, as if the wake
  word was heard (an automation's push-to-talk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from daemon import topics
from daemon.bus import Inbound
from daemon.errors import MessageError, TaskError
from daemon.messages import decode
from daemon.protocol.node import Event
from daemon.worker import TaskRun, task_input
from nodes.voice.intent import TimerRequest
from nodes.voice.pipeline import Announcer
from nodes.voice.timers import Timer, Timers

log = logging.getLogger(__name__)

MAX_ANNOUNCE: Final = 1000  # characters
ANNOUNCE_QUEUE: Final = 8  # announcements waiting per satellite; more are dropped


class AnnounceInput(BaseModel):
    """The input of a ``voice.announce`` task."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_ANNOUNCE)
    satellite: str | None = Field(default=None, max_length=128)
    area: str | None = Field(default=None, max_length=128)
    chime: bool = True


class ListenInput(BaseModel):
    """The input of a ``voice.listen`` task."""

    model_config = ConfigDict(extra="forbid")

    satellite: str | None = Field(default=None, max_length=128)


Publish = Callable[[str, Any, dict[str, Any], bool], Awaitable[None]]  # name, value, attrs, retain


class SatelliteExtras:
    """One satellite's timers and announcements (the node gives it a publish port)."""

    def __init__(
        self, me: str, name: str, area: str | None, publish: Publish,
        clock: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.me = me  # "<node_id>/<name>"
        self.name = name
        self.area = area
        self.publish = publish
        self.clock = clock
        self.timers = Timers()
        self.announcer: Announcer | None = None
        self._alarm: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue(ANNOUNCE_QUEUE)
        self._speaker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ timers

    async def timer(self, req: TimerRequest) -> str:
        speech = self.timers.handle(req, self.clock())
        await self._timers_changed()
        return speech

    async def _timers_changed(self) -> None:
        now = self.clock()
        snapshot = self.timers.snapshot(now)
        await self.publish("timers", len(snapshot), {"timers": snapshot}, True)
        if self._alarm is not None:
            self._alarm.cancel()
        due = self.timers.next_due()
        if due is not None:
            self._alarm = asyncio.create_task(self._ring(max(due - now, 0.0)))

    async def _ring(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._alarm = None  # this task ends here; _timers_changed may start the next
        finished = self.timers.due(self.clock())
        for timer in finished:
            await self.publish(
                "timer_finished", timer.name or timer.label,
                {"id": timer.id, "seconds": timer.seconds}, False,
            )  # fmt: skip
            self.say(_finished_text(timer), chime=True)
        await self._timers_changed()

    # ------------------------------------------------------------ announcements

    def say(self, text: str, *, chime: bool) -> bool:
        """Queue an announcement on this satellite (False when the queue is full)."""
        try:
            self._queue.put_nowait((text, chime))
        except asyncio.QueueFull:
            log.warning("announcement dropped (queue full): %s", text[:80])
            return False
        if self._speaker is None or self._speaker.done():
            self._speaker = asyncio.create_task(self._speak())
        return True

    async def _speak(self) -> None:
        while not self._queue.empty():
            text, chime = self._queue.get_nowait()
            if self.announcer is None:
                await self.publish("announced", text, {"spoken": False}, False)
                continue
            await self.announcer.announce(text, chime_first=chime)

    async def broadcast(self, text: str) -> None:
        """The "broadcast ..." intent: every other satellite says it."""
        await self.publish(
            "broadcast", text[:MAX_ANNOUNCE],
            {"id": uuid.uuid4().hex[:12], "chime": True, "exclude": self.me}, False,
        )  # fmt: skip

    def addressed(self, attrs: dict[str, Any]) -> bool:
        if attrs.get("exclude") == self.me:
            return False
        # "to_satellite"/"to_area": every event's "satellite" is its publisher's name.
        satellite, area = attrs.get("to_satellite"), attrs.get("to_area")
        if satellite is not None:
            return satellite in (self.name, self.me)
        if area is not None:
            return isinstance(area, str) and area.lower() == (self.area or "").lower()
        return True

    async def on_broadcast(self, msg: Inbound) -> None:
        """A ``voice/broadcast`` event of any realm node (its topic says which)."""
        if topics.EVENT.parse(msg.topic) is None:
            return
        try:
            event = decode(msg.payload, Event)
        except MessageError as exc:
            log.warning("bad broadcast event on %s: %s", msg.topic[:200], exc)
            return
        if isinstance(event.value, str) and event.value and self.addressed(event.attrs):
            self.say(event.value[:MAX_ANNOUNCE], chime=event.attrs.get("chime") is not False)

    async def close(self) -> None:
        for task in (self._alarm, self._speaker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _finished_text(timer: Timer) -> str:
    return f"Your {timer.name} timer is done." if timer.name else f"Your {timer.label} is done."


async def execute_announce(publish: Publish, task: TaskRun) -> Any:
    """``voice.announce``: a ``voice/broadcast`` event every satellite hears."""
    inp = task_input(AnnounceInput, task.input, "voice.announce input")
    aid = uuid.uuid4().hex[:12]
    attrs = {"id": aid, "chime": inp.chime, "to_satellite": inp.satellite, "to_area": inp.area}
    await publish("broadcast", inp.text, {k: v for k, v in attrs.items() if v is not None}, False)
    return {"id": aid, "satellite": inp.satellite, "area": inp.area}


async def execute_listen(satellites: dict[str, SatelliteExtras], task: TaskRun) -> Any:
    inp = task_input(ListenInput, task.input, "voice.listen input")
    name = inp.satellite or next(iter(satellites), None)
    extras = satellites.get(name or "")
    if extras is None or extras.announcer is None:
        raise TaskError("bad_input", f"no running satellite {inp.satellite!r} on this node")
    started = await extras.announcer.listen()
    return {"satellite": extras.name, "listening": started}
