"""Devices learned from the broker: the bus side of :mod:`nodes.voice.discovery`.

Subscribes to every Home Assistant discovery config under the prefix
(``<prefix>/+/+/config`` and ``<prefix>/+/+/+/config``, retained, so a
satellite that starts late learns every device at once), keeps the
:class:`~nodes.voice.devices.Registry` up to date, and follows each learned
entity's state topic (for "is the garage door open") and availability topics
(an unavailable device is not commanded).  An empty retained config forgets
the entity.  A hostile config costs one log line, never a crash; at most
:data:`~nodes.voice.discovery.MAX_ENTITIES` are learned.
"""

from __future__ import annotations

import json
import logging
from typing import Final, Protocol

from daemon import topics
from daemon.bus import Inbound
from daemon.bus_types import Handler, truncate
from nodes.voice import discovery
from nodes.voice.devices import Entity, Registry
from nodes.voice.discovery import Forget, Refused

log = logging.getLogger(__name__)

MAX_STATE_BYTES: Final = 4096
MAX_STATE_TEXT: Final = 32


class Subscriber(Protocol):
    """What the watcher needs of the bus (``Bus`` has it)."""

    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...

    async def unsubscribe(self, topic_filter: str) -> None: ...


def state_of(payload: bytes) -> str | None:
    """A state topic's value, spoken: ``ON`` → on, ``{"state":"OFF"}`` → off, ``open``."""
    if not payload or len(payload) > MAX_STATE_BYTES:
        return None
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            return None
        value = data.get("state") if isinstance(data, dict) else None
        text = str(value) if isinstance(value, str | int | float) else ""
    text = text.lower()
    return text if 0 < len(text) <= MAX_STATE_TEXT and text.isprintable() else None


class BrokerDevices:
    def __init__(self, bus: Subscriber, prefix: str, registry: Registry) -> None:
        self.bus = bus
        self.prefix = prefix
        self.registry = registry
        self._watched: dict[str, set[str]] = {}  # state/availability topic -> entity keys
        self.refused = 0

    async def start(self) -> None:
        for topic_filter in topics.ha_discovery_any_filters(self.prefix):
            await self.bus.subscribe(topic_filter, self.on_config)

    async def on_config(self, msg: Inbound) -> None:
        where = topics.ha_discovery_parse_any(self.prefix, msg.topic)
        if where is None:
            return
        component, node_id, object_id = where
        key = f"{component}/{node_id}/{object_id}" if node_id else f"{component}/{object_id}"
        result = discovery.parse(key, component, msg.payload)
        if isinstance(result, Forget):
            gone = [
                k for k in list(self.registry.discovered) if k == key or k.startswith(key + "/")
            ]
            for k in gone:
                if (entity := self.registry.forget(k)) is not None:
                    await self._unwatch(entity)
                    log.info("forgot %s (%s)", entity.name, k)
            return
        if isinstance(result, Refused):
            if not result.reason.startswith("component"):  # a sensor: not ours, not an error
                self.refused += 1
                log.warning("discovery config %s refused: %s (%s)", msg.topic[:200],
                            result.reason, truncate(msg.payload, 120))  # fmt: skip
            return
        for entity in result if isinstance(result, list) else [result]:
            await self._learn(entity)

    async def _learn(self, entity: Entity) -> None:
        old = self.registry.discovered.get(entity.key)
        if old is None and len(self.registry.discovered) >= discovery.MAX_ENTITIES:
            self.refused += 1
            log.warning("discovery: %d entities known, %s not learned",
                        discovery.MAX_ENTITIES, entity.key)  # fmt: skip
            return
        if not self.registry.learn(entity):
            return
        if old is not None:
            await self._unwatch(old)
        log.info("learned %s %r (area %s) from the broker", entity.component, entity.name,
                 entity.area)  # fmt: skip
        for topic in self._topics(entity):
            keys = self._watched.setdefault(topic, set())
            first = not keys
            keys.add(entity.key)
            if first:
                await self.bus.subscribe(topic, self.on_state)

    @staticmethod
    def _topics(entity: Entity) -> list[str]:
        out = [a.topic for a in entity.availability]
        if entity.state_topic:
            out.append(entity.state_topic)
        return out

    async def _unwatch(self, entity: Entity) -> None:
        self.registry.states.pop(entity.key, None)
        self.registry.unavailable.discard(entity.key)
        for topic in self._topics(entity):
            keys = self._watched.get(topic)
            if keys is None:
                continue
            keys.discard(entity.key)
            if not keys:
                del self._watched[topic]
                await self.bus.unsubscribe(topic)

    async def on_state(self, msg: Inbound) -> None:
        for key in self._watched.get(msg.topic, set()):
            entity = self.registry.discovered.get(key)
            if entity is None:
                continue
            text = msg.payload[:MAX_STATE_BYTES].decode("utf-8", "replace").strip()
            if text.startswith("{"):  # zigbee2mqtt's bridge/state: {"state": "online"}
                text = state_of(msg.payload) or ""
            for avail in entity.availability:
                if avail.topic == msg.topic:
                    if text.lower() == avail.not_available.lower():
                        self.registry.unavailable.add(key)
                    elif text.lower() == avail.available.lower():
                        self.registry.unavailable.discard(key)
            if entity.state_topic == msg.topic and (state := state_of(msg.payload)) is not None:
                self.registry.states[key] = state
