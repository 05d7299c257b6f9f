"""What a node is: the base class every node type extends, and its context.

A *node daemon* (one MQTT identity, ``node/<node_id>/...``) hosts several
*nodes* (sensors, microphone, camera, chat, ...).  Each node:

* loads its backends in :meth:`Node.setup` — a backend whose package or model
  is missing fails soft and is simply not advertised;
* advertises what really works through :meth:`Node.capabilities`, and what
  dashboards can show and control through :meth:`Node.entities`;
* does its continuous job (reading sensors, watching a camera) in
  :meth:`Node.run`, supervised: if it raises it is restarted with backoff;
* executes assigned tasks in :meth:`Node.execute` (see ``daemon.worker``);
* lets go of everything :meth:`Node.setup` loaded in :meth:`Node.close`.

A restart (``node/<id>/cmd/restart``) cancels :meth:`Node.run`, calls
:meth:`Node.close` and then :meth:`Node.setup` again on the same object, so
setup must start from what close left, and what lives as long as the node
(bus subscriptions: the bus stacks handlers per filter) is made only once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from daemon import topics
from daemon.bus import Bus
from daemon.entities import EntitySpec
from daemon.protocol.node import Capability, Event

if TYPE_CHECKING:
    from daemon.client import RealmClient
    from daemon.config import Config
    from daemon.plugins import NodeConfigBase
    from daemon.spool import EventSpool
    from daemon.worker import TaskRun


@dataclass
class NodeContext:
    """What a node may use of its daemon: identity, bus, config, helpers."""

    node_id: str
    config: Config
    bus: Bus
    state_dir: Path
    announce: Callable[[], Awaitable[None]]
    extras: dict[str, Any] = field(default_factory=dict)
    # The daemon's event spool: events get their seq and boot id there and outlive a
    # lost broker and a restart.  None (a context built for a test or a tool): events
    # go straight to the bus, unnumbered.
    events: EventSpool | None = None

    @property
    def realm(self) -> str:
        return self.config.realm

    def realm_client(self) -> RealmClient:
        """A client for the tasks this node submits itself (a camera's detections, a
        satellite's chat): user and origin are this daemon's id, the token
        ``daemon.token_file``.  Call ``start()`` on it before use."""
        from daemon.client import RealmClient

        return RealmClient(
            self.bus,
            self.realm,
            user=self.node_id,
            token=self.config.node_token(),
            origin=self.node_id,
        )

    async def publish_event(
        self,
        domain: str,
        name: str,
        value: float | int | str | bool | None = None,
        *,
        unit: str | None = None,
        device_class: str | None = None,
        attrs: dict[str, Any] | None = None,
        retain: bool = False,
        wait: bool = False,
    ) -> None:
        """Publish ``event/<node_id>/<domain>/<name>``: numbered and spooled on disk
        until the broker has it (see :mod:`daemon.spool`); returns at once, or with
        ``wait`` once the broker has acknowledged it."""
        topic = topics.EVENT.build(realm=self.realm, node_id=self.node_id, domain=domain, name=name)
        event = Event(value=value, unit=unit, device_class=device_class, attrs=attrs or {})
        if self.events is not None:
            await self.events.publish(topic, event, retain=retain, wait=wait)
        else:
            await self.bus.publish(topic, event, qos=1, retain=retain, wait=wait)

    async def publish_media(
        self, stream: str, data: bytes, content_type: str, *, retain: bool = False
    ) -> None:
        """Binary on ``media/<node_id>/<stream>`` with an MQTT 5 content type."""
        topic = topics.MEDIA.build(realm=self.realm, node_id=self.node_id, stream=stream)
        await self.bus.publish(
            topic, data, qos=1, retain=retain, content_type=content_type, wait=False
        )


class Node:
    """Base of every node type."""

    type_name: ClassVar[str] = ""

    def __init__(self, name: str, config: NodeConfigBase, ctx: NodeContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx
        self.log = logging.getLogger(f"nodes.{self.type_name or type(self).__name__}.{name}")

    async def setup(self) -> None:
        """Load backends and models (off the event loop).  Raise to mark the node failed."""

    def capabilities(self) -> list[Capability]:
        """What this node can do for the realm right now."""
        return []

    def entities(self) -> list[EntitySpec]:
        """What this node shows on dashboards / Home Assistant (see :mod:`daemon.entities`)."""
        return []

    async def republish(self) -> None:
        """Publish the current state of non-retained entities again: a dashboard
        (Home Assistant's birth message) just came up and has not seen them."""

    async def run(self) -> None:
        """The node's continuous job; the default just waits to be cancelled."""
        await asyncio.Event().wait()

    async def execute(self, task: TaskRun) -> Any:
        """Run one assigned task and return its output (JSON-able)."""
        raise NotImplementedError(f"node {self.name} executes no tasks")

    async def close(self) -> None:
        """Release what :meth:`setup` loaded (models, devices, clients): on shutdown,
        and before :meth:`setup` runs again on a restart."""
