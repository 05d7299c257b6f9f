"""The discovery bridge: keeps one device's entities announced to Home Assistant.

One :class:`Bridge` per process that owns a Home Assistant device (each node
daemon; the orchestrator for the realm device).  It

* publishes every entity's discovery config, retained, when the entity set
  changes and again on every (re)connect (``refresh``);
* publishes them all again when Home Assistant's birth (``online`` on the
  birth topic) arrives, and lets the nodes send their current (not retained)
  states again (:meth:`daemon.node.Node.republish`);
* has the states sent again ``STATES_AFTER_DISCOVERY`` seconds after it
  announced new configs: Home Assistant subscribes to an entity's state topic
  only once it has processed its config, so the first readings of a daemon
  that starts while it runs were lost (a sensor stayed ``unknown`` until its
  next change or heartbeat, up to 5 minutes);
* removes what is no longer configured: it subscribes to its own
  ``<prefix>/+/<node_id>/+/config``, so the broker's retained configs tell it
  what an earlier run announced; any config that is not in the current set is
  cleared with an empty retained payload — but only once the entity set is
  *settled* (every hosted node finished its setup), so a node that is still
  loading its models does not lose its entities for a moment;
* routes commands: an entity with ``on_command`` gets its
  :class:`~daemon.entities.EntityCommand` from ``node/<id>/entity/<object_id>/set``,
  validated for its component, then awaited; the node reports the new state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.entities import EntityCommand, EntitySpec
from daemon.errors import MessageError
from daemon.homeassistant.config import HomeAssistantConfig
from daemon.homeassistant.discovery import (
    SWITCH_OFF,
    SWITCH_ON,
    Device,
    discovery_topic,
    entity_config,
    missing,
    safe_id,
)
from daemon.messages import decode

log = logging.getLogger(__name__)

# Home Assistant's default limit for a text entity's length.
TEXT_MAX_DEFAULT = 255
# After announcing new configs, send the states again this long after (s): Home
# Assistant processes a config within well under a second, a busy Pi within a few.
STATES_AFTER_DISCOVERY: Final = (2.0, 10.0)


class CommandError(ValueError):
    """A command value that does not fit its entity."""


def command_value(spec: EntitySpec, value: Any) -> Any:
    """The value ``on_command`` gets for a raw command value, or :class:`CommandError`."""
    comp = spec.component
    if comp == "button":
        return None
    if comp == "switch":
        if value in (SWITCH_ON, True):
            return spec.payload_on
        if value in (SWITCH_OFF, False):
            return spec.payload_off
        raise CommandError(f"a switch takes {SWITCH_ON!r} or {SWITCH_OFF!r}, not {value!r}")
    if comp == "number":
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise CommandError(f"a number takes a finite number, not {value!r}")
        low, high = spec.extra.get("min"), spec.extra.get("max")
        if (low is not None and number < low) or (high is not None and number > high):
            raise CommandError(f"{number:g} is outside [{low}, {high}]")
        return number
    if comp in ("select", "alarm_control_panel"):
        if not isinstance(value, str) or (spec.options and value not in spec.options):
            raise CommandError(f"{value!r} is not one of {list(spec.options)}")
        return value
    if comp == "text":
        if not isinstance(value, str):
            raise CommandError(f"a text takes a string, not {value!r}")
        limit = int(spec.extra.get("max", TEXT_MAX_DEFAULT))
        if len(value) > limit:
            raise CommandError(f"text longer than {limit} characters")
        return value
    raise CommandError(f"a {comp} takes no commands")


class Bridge:
    """Announces one device's entities and routes their commands (see the module doc)."""

    def __init__(
        self,
        bus: Bus,
        config: HomeAssistantConfig,
        device: Device,
        *,
        realm: str,
        node_id: str,
        entities: Callable[[], list[EntitySpec]],
        settled: Callable[[], bool] = lambda: True,
        commands: bool = True,
        republish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.config = config
        self.device = device
        self.realm = realm
        self.node_id = node_id
        self._entities = entities
        self._settled = settled
        self._republish = republish
        self._routes_commands = commands
        self._lock = asyncio.Lock()
        self._published: dict[str, bytes] = {}  # topic -> payload announced by this run
        self._on_broker: set[str] = set()  # retained configs of ours seen on the broker
        self._commands: dict[str, EntitySpec] = {}  # object_id -> controllable entity
        self._connects = -1
        self._warned: set[str] = set()  # object ids already warned about
        self.announcements = 0  # full announcements made (connects, births)
        self._states_task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def own_filter(self) -> str:
        return topics.ha_discovery_filter(self.config.discovery_prefix, self.device.ha_node_id)

    async def start(self) -> None:
        """Subscribe to the birth topic, our own configs and our command topic."""
        if not self.enabled:
            return
        await self.bus.subscribe(self.config.birth_topic, self._on_birth)
        await self.bus.subscribe(self.own_filter, self._on_existing)
        if not self._routes_commands:
            return
        cmd_filter = topics.ENTITY_SET.filter(realm=self.realm, node_id=self.node_id)
        await self.bus.subscribe(cmd_filter, self._on_command)

    # ------------------------------------------------------------- announcing

    def desired(self) -> dict[str, bytes]:
        """Every current entity's discovery topic and payload."""
        out: dict[str, bytes] = {}
        commands: dict[str, EntitySpec] = {}
        try:
            specs = self._entities()
        except Exception:
            log.exception("listing entities for Home Assistant failed")
            specs = []
        prefix, nid = self.config.discovery_prefix, self.node_id
        seen: set[str] = set()
        for spec in specs:
            object_id, cfg = entity_config(spec, self.device, realm=self.realm, node_id=nid)
            topic = discovery_topic(prefix, spec.component, self.device, object_id)
            lacks = missing(spec.component, cfg)
            if lacks:
                if object_id not in self._warned:
                    self._warned.add(object_id)
                    log.warning("entity %s not announced: it has no %s", object_id, lacks)
                continue
            if object_id in seen:
                if object_id not in self._warned:
                    self._warned.add(object_id)
                    log.warning("two entities share the object id %r; keeping the first", object_id)
                continue
            seen.add(object_id)
            out[topic] = json.dumps(cfg, separators=(",", ":"), sort_keys=True).encode()
            if spec.on_command is not None and spec.command_topic is None:
                commands[spec.object_id] = spec
        self._commands = commands
        return out

    async def refresh(self, *, force: bool = False) -> None:
        """Publish new or changed configs (all of them after a reconnect or with ``force``)
        and clear the ones no longer wanted once the entity set is settled."""
        if not self.enabled:
            return
        async with self._lock:
            if not self.bus.connected:
                self.desired()  # routes commands; the connect will announce
                return
            if self.bus.connects != self._connects:
                self._connects = self.bus.connects
                force = True
            desired = self.desired()
            if force:
                self.announcements += 1
            announced = False
            for topic, payload in desired.items():
                if force or self._published.get(topic) != payload:
                    await self.bus.publish(topic, payload, qos=1, retain=True, wait=False)
                    self._published[topic] = payload
                    announced = True
            if announced:
                self._states_later()
            if self._settled():
                stale = (set(self._published) | self._on_broker) - set(desired)
                for topic in sorted(stale):
                    await self._clear(topic)

    def _states_later(self) -> None:
        """Send the states again once Home Assistant has had time to subscribe to the
        state topics of the configs just announced (one pending schedule at a time)."""
        if self._republish is None:
            return
        if self._states_task is not None:
            self._states_task.cancel()
        self._states_task = asyncio.get_running_loop().create_task(self._states_after())

    async def _states_after(self) -> None:
        assert self._republish is not None
        waited = 0.0
        for at in STATES_AFTER_DISCOVERY:
            await asyncio.sleep(at - waited)
            waited = at
            try:
                await self._republish()
            except Exception:
                log.exception("sending the states again for Home Assistant failed")

    async def _clear(self, topic: str) -> None:
        log.info("removing Home Assistant entity %s (no longer configured)", topic)
        await self.bus.publish(topic, b"", qos=1, retain=True, wait=False)
        self._published.pop(topic, None)
        self._on_broker.discard(topic)

    async def _on_birth(self, msg: Inbound) -> None:
        if msg.payload.strip() == b"online":
            log.info("Home Assistant is online: announcing discovery again")
            await self.refresh(force=True)
            if self._republish is not None:  # and the states it has not seen (not retained)
                await self._republish()

    async def _on_existing(self, msg: Inbound) -> None:
        """A retained config of ours on the broker: forget it or clear it if stale."""
        if not msg.payload:
            self._on_broker.discard(msg.topic)
            return
        if msg.topic in self._published:
            return
        self._on_broker.add(msg.topic)
        await self.refresh()

    # --------------------------------------------------------------- commands

    async def _on_command(self, msg: Inbound) -> None:
        fields = topics.ENTITY_SET.parse(msg.topic)
        if fields is None:
            return
        spec = self._commands.get(fields["object_id"])
        if spec is None or spec.on_command is None:
            log.warning("command for unknown entity %s (payload %s)", msg.topic, msg.preview())
            return
        try:
            cmd = decode(msg.payload, EntityCommand)
            value = command_value(spec, cmd.value)
        except (MessageError, CommandError) as exc:
            log.warning("bad command on %s: %s (payload %s)", msg.topic, exc, msg.preview())
            return
        log.info("command %s -> %r", spec.object_id, value)
        try:
            await spec.on_command(value)
        except Exception:
            log.exception("entity %s failed to carry out its command", spec.object_id)


def device_id(realm: str, node_id: str) -> str:
    """The stable device identifier of a node daemon (or ``realm`` for the realm device)."""
    return safe_id(f"mtor_{realm}_{node_id}")
