"""The node daemon's Home Assistant device: its own entities plus its nodes' entities.

The daemon itself shows as one device (identifiers ``mtor_<realm>_<node_id>``)
with: a connectivity binary sensor bound to ``node/<id>/state`` (always
available, so it reads *off* when the daemon is gone), a restart button that
publishes a :class:`~daemon.protocol.node.NodeCommand` on
``node/<id>/cmd/restart``, and diagnostic sensors read from the retained
``node/<id>/health`` (CPU %, temperature, load, memory — each only when this
host can measure it).  Every hosted node that finished its setup adds
:meth:`~daemon.node.Node.entities`; a node whose setup failed adds nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from daemon import hostinfo, topics
from daemon.entities import EntitySpec
from daemon.homeassistant.bridge import Bridge, device_id
from daemon.homeassistant.discovery import Device
from daemon.hosting import DaemonPort
from daemon.messages import encode
from daemon.protocol.node import NodeCommand

if TYPE_CHECKING:
    from daemon.hosting import HostedNode
    from daemon.protocol.node import Hardware

log = logging.getLogger(__name__)


class NodeDaemonPort(DaemonPort, Protocol):
    """What the daemon's device uses of its node daemon
    (:class:`daemon.runtime.NodeDaemon` is one)."""

    @property
    def hardware(self) -> Hardware: ...

    @property
    def state_topic(self) -> str: ...

    @property
    def health_topic(self) -> str: ...

    @property
    def hosted(self) -> Mapping[str, HostedNode]: ...


def daemon_entities(daemon: NodeDaemonPort) -> list[EntitySpec]:
    """The daemon's own entities (online state, restart, health)."""
    realm, nid = daemon.config.realm, daemon.node_id
    out = [
        EntitySpec(
            component="binary_sensor",
            object_id="online",
            name="Online",
            state_topic=daemon.state_topic,
            value_key="state",
            device_class="connectivity",
            payload_on="online",
            payload_off="offline",
            diagnostic=True,
            always_available=True,
        ),
        EntitySpec(
            component="button",
            object_id="restart",
            name="Restart nodes",
            command_topic=topics.NODE_CMD.build(realm=realm, node_id=nid, command="restart"),
            device_class="restart",
            extra={"payload_press": encode(NodeCommand()).decode(), "entity_category": "config"},
        ),
    ]
    if not daemon.config.homeassistant.health_entities:
        return out
    health = daemon.health_topic

    def diag(object_id: str, name: str, key: str, unit: str | None, icon: str = "") -> EntitySpec:
        return EntitySpec(
            component="sensor",
            object_id=object_id,
            name=name,
            state_topic=health,
            value_key=key,
            unit=unit,
            state_class="measurement",
            diagnostic=True,
            icon=icon or None,
        )

    out.append(diag("health_cpu", "CPU", "cpu_percent", "%", icon="mdi:cpu-64-bit"))
    if hostinfo.cpu_temperature() is not None:
        temp = diag("health_temperature", "CPU temperature", "temperature_c", "°C")
        out.append(
            dataclasses.replace(temp, device_class="temperature", measures="host.temperature")
        )
    if hostinfo.load() is not None:
        load = diag("health_load", "Load (1 min)", "load.0", None, icon="mdi:gauge")
        out.append(dataclasses.replace(load, measures="host.load"))
    if hostinfo.memory():
        mem = diag("health_memory", "Memory used", "mem_percent", "%", icon="mdi:memory")
        out.append(dataclasses.replace(mem, measures="host.memory"))
    return out


class NodeEntities:
    """What the bridge announces for one daemon, and whether that set is final yet."""

    def __init__(self, daemon: NodeDaemonPort) -> None:
        self.daemon = daemon
        self._own = daemon_entities(daemon)

    def __call__(self) -> list[EntitySpec]:
        specs: list[EntitySpec] = []
        for hosted in self.daemon.hosted.values():
            if not hosted.ready or hosted.node is None:
                continue
            try:
                specs.extend(hosted.node.entities())
            except Exception:
                log.exception("node %s failed to list its entities", hosted.name)
        # A node that measures the same (a sensors node's load, memory, temperature)
        # replaces the daemon's own diagnostic: one entity per measurement.  Until
        # every node is set up, such a diagnostic waits (announced, then removed a
        # moment later when the sensors node is ready, it would flicker in HA).
        if not self.settled():
            return [s for s in self._own if not s.measures] + specs
        taken = {s.measures for s in specs if s.measures}
        return [s for s in self._own if s.measures not in taken] + specs

    async def republish(self) -> None:
        """Every ready node publishes its current states again (after HA's birth)."""
        for hosted in self.daemon.hosted.values():
            if not hosted.ready or hosted.node is None:
                continue
            try:
                await hosted.node.republish()
            except Exception:
                log.exception("node %s failed to publish its states again", hosted.name)

    def settled(self) -> bool:
        """Every hosted node finished its setup (ready, or failed for good)."""
        # Not "no node object yet": a node is made only after the crash guard's probe.
        return all(
            h.ready or h.job.status in ("failed", "stopped") for h in self.daemon.hosted.values()
        )


def node_bridge(daemon: NodeDaemonPort) -> Bridge:
    """The bridge of a node daemon (started by :class:`~daemon.runtime.NodeDaemon`)."""
    cfg = daemon.config
    ha = cfg.homeassistant
    hw = daemon.hardware
    device = Device(
        ha_node_id=device_id(cfg.realm, daemon.node_id),
        identifier=device_id(cfg.realm, daemon.node_id),
        name=ha.device_name or daemon.node_id,
        model=f"M-TOR node ({hw.board or hw.arch})",
        area=cfg.area,
        availability_topic=daemon.state_topic,
        support_url=ha.support_url,
    )
    source = NodeEntities(daemon)
    return Bridge(
        daemon.bus,
        ha,
        device,
        realm=cfg.realm,
        node_id=daemon.node_id,
        entities=source,
        settled=source.settled,
        republish=source.republish,
    )
