"""The gateway's live picture of the realm, and its fan-out to WebSocket clients.

Fed with decoded messages (node state, adverts, health, events, the
orchestrator's stats, task updates of tasks the gateway submitted); no bus, no
sockets.  Every change becomes one JSON text, encoded once, offered to each
subscriber whose principal may see it.  A subscriber's queue is bounded: a
slow client loses its oldest messages (counted), never the gateway's memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from daemon.gateway.auth import Principal
from daemon.protocol.node import Event, NodeHealth, NodeInfo, NodeState
from daemon.protocol.task import TaskUpdate

# Recent events kept for a new page (and GET /api/events).
RECENT_EVENTS: Final = 200
# Nodes remembered at most (the orchestrator's registry bound).
MAX_NODES: Final = 10_000
# Messages queued per WebSocket client before its oldest are dropped.
SUBSCRIBER_QUEUE: Final = 512
# Cameras' latest snapshots kept (media/<node>/<camera>/snapshot), and the largest one.
MAX_SNAPSHOTS: Final = 64
MAX_SNAPSHOT_BYTES: Final = 4 << 20

Audience = Literal["all", "events", "sysop"]


@dataclass(slots=True)
class NodeView:
    node_id: str
    state: str = "unknown"
    boot_id: str | None = None
    since: float | None = None
    info: NodeInfo | None = None
    health: NodeHealth | None = None

    def to_json(self) -> dict[str, Any]:
        info, health = self.info, self.health
        return {
            "node_id": self.node_id,
            "online": self.state == "online",
            "state": self.state,
            "boot_id": self.boot_id,
            "since": self.since,
            "hostname": info.hostname if info else None,
            "area": info.area if info else None,
            "version": info.version if info else None,
            "hardware": info.hardware.model_dump(mode="json") if info else None,
            "nodes": [n.model_dump(mode="json") for n in info.nodes] if info else [],
            "capabilities": [c.model_dump(mode="json") for c in info.capabilities] if info else [],
            "health": health.model_dump(mode="json", exclude={"type", "v"}) if health else None,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    node_id: str
    camera: str
    data: bytes
    content_type: str
    ts: float

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "camera": self.camera,
            "content_type": self.content_type,
            "bytes": len(self.data),
            "ts": self.ts,
        }


@dataclass(eq=False, slots=True)
class Subscriber:
    principal: Principal
    queue: asyncio.Queue[str] = field(
        default_factory=lambda: asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
    )
    dropped: int = 0

    def offer(self, text: str) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(text)

    def may_see(self, audience: Audience, user: str | None) -> bool:
        p = self.principal
        if user is not None:  # a task's updates: its submitter (and the sysops)
            return p.sysop or p.name == user
        if audience == "events":
            return p.sees_events
        if audience == "sysop":
            return p.sysop
        return True


class Hub:
    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.stats: dict[str, Any] | None = None
        self.orchestrator: dict[str, Any] | None = None
        self.snapshots: dict[tuple[str, str], Snapshot] = {}
        self.subscribers: set[Subscriber] = set()
        self.sent = 0

    # ------------------------------------------------------------- the picture

    def _node(self, node_id: str) -> NodeView | None:
        view = self.nodes.get(node_id)
        if view is None:
            if len(self.nodes) >= MAX_NODES:
                gone = next((k for k, v in self.nodes.items() if v.state != "online"), None)
                if gone is None:
                    return None
                del self.nodes[gone]
            view = self.nodes[node_id] = NodeView(node_id)
        return view

    def on_state(self, node_id: str, state: NodeState | None) -> None:
        if state is None:  # the retained state was cleared: the node is gone
            if self.nodes.pop(node_id, None) is not None:
                self._emit("node_removed", {"node_id": node_id}, "all")
            return
        view = self._node(node_id)
        if view is None:
            return
        view.state, view.boot_id, view.since = state.state, state.boot_id, state.ts
        self._emit("node", view.to_json(), "all")

    def on_info(self, node_id: str, info: NodeInfo | None) -> None:
        view = self._node(node_id)
        if view is None:
            return
        view.info = info
        self._emit("node", view.to_json(), "all")

    def on_health(self, node_id: str, health: NodeHealth | None) -> None:
        view = self._node(node_id)
        if view is None:
            return
        view.health = health
        self._emit("node", view.to_json(), "all")

    def on_event(self, node_id: str, domain: str, name: str, event: Event) -> None:
        doc = {
            "node_id": node_id,
            "domain": domain,
            "name": name,
            **event.model_dump(mode="json", exclude={"type", "v"}),
        }
        self.events.append(doc)
        self._emit("event", doc, "events")

    def on_snapshot(self, node_id: str, camera: str, data: bytes, content_type: str) -> None:
        """A camera's retained snapshot (an empty payload: it was cleared)."""
        key = (node_id, camera)
        if not data:
            if self.snapshots.pop(key, None) is not None:
                self._emit("camera_removed", {"node_id": node_id, "camera": camera}, "events")
            return
        if len(data) > MAX_SNAPSHOT_BYTES or not content_type.startswith("image/"):
            return
        if key not in self.snapshots and len(self.snapshots) >= MAX_SNAPSHOTS:
            oldest = min(self.snapshots.values(), key=lambda s: s.ts)
            del self.snapshots[(oldest.node_id, oldest.camera)]
        snap = self.snapshots[key] = Snapshot(node_id, camera, data, content_type, time.time())
        self._emit("camera", snap.to_json(), "events")  # not "snapshot": the first frame

    def on_stats(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        self._emit("stats", stats, "all")

    def on_orchestrator(self, state: dict[str, Any]) -> None:
        self.orchestrator = state
        self._emit("orchestrator", state, "all")

    def on_task(self, user: str, capability: str, update: TaskUpdate) -> None:
        doc = {"capability": capability, "user": user, **update.model_dump(mode="json")}
        doc.pop("key", None)
        self._emit("task", doc, "all", user=user)

    def capabilities(self) -> dict[str, list[dict[str, Any]]]:
        """Every capability online nodes offer, with who offers it."""
        out: dict[str, list[dict[str, Any]]] = {}
        for view in self.online():
            assert view.info is not None
            for cap in view.info.capabilities:
                out.setdefault(cap.name, []).append(
                    {"node_id": view.node_id, "backend": cap.backend, "model": cap.model}
                )
        return out

    def online(self) -> Iterable[NodeView]:
        return (v for v in self.nodes.values() if v.state == "online" and v.info is not None)

    def snapshot(self, principal: Principal) -> dict[str, Any]:
        """What a new WebSocket client gets first."""
        return {
            "nodes": [v.to_json() for v in self.nodes.values()],
            "events": list(self.events) if principal.sees_events else [],
            "snapshots": [s.to_json() for s in self.snapshots.values()]
            if principal.sees_events
            else [],
            "stats": self.stats,
            "orchestrator": self.orchestrator,
            "me": {"name": principal.name, "role": principal.role},
        }

    # -------------------------------------------------------------- fan-out

    def subscribe(self, principal: Principal) -> Subscriber:
        sub = Subscriber(principal)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def _emit(self, kind: str, data: Any, audience: Audience, *, user: str | None = None) -> None:
        if not self.subscribers:
            return
        text = json.dumps({"kind": kind, "ts": round(time.time(), 3), "data": data})
        for sub in self.subscribers:
            if sub.may_see(audience, user):
                sub.offer(text)
                self.sent += 1
