"""The alarm panel's state: the realm's armed value, or ``triggered`` after an alarm.

Home Assistant's ``alarm_control_panel`` has one state topic.  The realm's
``state/armed`` only says armed or not; whether an alarm is going off comes
from the cameras' ``vision/alarm`` events.  :class:`AlarmPanel` (run by the
realm bridge, in the orchestrator) follows both and publishes the panel's
state, retained, on ``event/realm/alarm/panel`` (the ``realm`` node id is
reserved, so no node can write it): the armed value, ``triggered`` for
``TRIGGERED_SECONDS`` after the last alarm while armed, back to the armed
value after that or at once when disarmed.  :func:`panel_state` is the pure
rule.  A malformed message is logged once and ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.node import Event
from daemon.protocol.state import RealmState

log = logging.getLogger(__name__)

ARMED_KEY: Final = "armed"
PANEL_NODE: Final = "realm"  # reserved node id (the realm device)
TRIGGERED_SECONDS: Final = 120.0  # the panel shows triggered this long after the last alarm
DISARMED: Final = frozenset({"disarmed", "off", "false", "0", ""})


def panel_topic(realm: str) -> str:
    return topics.EVENT.build(realm=realm, node_id=PANEL_NODE, domain="alarm", name="panel")


def is_armed(value: object) -> bool:
    if value is None or value is False:
        return False
    return str(value).strip().lower() not in DISARMED


def panel_state(armed: object, last_alarm: float | None, now: float) -> str:
    """``triggered`` while armed and within ``TRIGGERED_SECONDS`` of an alarm, else the
    armed value (``disarmed`` when unknown)."""
    if not is_armed(armed):
        return "disarmed"
    if last_alarm is not None and now - last_alarm < TRIGGERED_SECONDS:
        return "triggered"
    return str(armed)


class AlarmPanel:
    def __init__(self, bus: Bus, realm: str) -> None:
        self.bus = bus
        self.realm = realm
        self.armed: object = None
        self.last_alarm: float | None = None
        self.published: str | None = None
        self.alarms = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.bus.subscribe(
            topics.STATE.build(realm=self.realm, key=ARMED_KEY), self._on_armed
        )
        alarms = topics.EVENT.filter(realm=self.realm, domain="vision", name="alarm")
        await self.bus.subscribe(alarms, self._on_alarm)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    async def _on_armed(self, msg: Inbound) -> None:
        if not msg.payload:
            self.armed = None
        else:
            try:
                self.armed = decode(msg.payload, RealmState).value
            except MessageError as exc:
                log.warning("alarm panel: bad armed state: %s (%s)", exc, msg.preview())
                return
        await self.publish()

    async def _on_alarm(self, msg: Inbound) -> None:
        if not msg.payload:
            return
        try:
            decode(msg.payload, Event)
        except MessageError as exc:
            log.warning("alarm panel: bad alarm event on %s: %s", msg.topic, exc)
            return
        if not is_armed(self.armed):
            return  # an alarm raised before the disarm arrived: nothing to show
        self.alarms += 1
        self.last_alarm = time.monotonic()
        await self.publish()
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(TRIGGERED_SECONDS + 0.05, self._expired)

    def _expired(self) -> None:
        task = asyncio.ensure_future(self.publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self) -> None:
        state = panel_state(self.armed, self.last_alarm, time.monotonic())
        if state == self.published:
            return
        self.published = state
        await self.bus.publish(panel_topic(self.realm), Event(value=state), retain=True)
