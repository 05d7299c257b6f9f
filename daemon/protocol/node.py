"""Node presence, capability adverts, health and events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from daemon.messages import Message, Part, now

Scalar = float | int | str | bool | None


class NodeState(Message):
    """Birth and will: ``node/<id>/state``, retained, QoS 1.

    The offline will carries the same ``boot_id`` as the birth, so a stale
    will of an older boot can be told from the current one.
    """

    TYPE = "node.state"

    state: Literal["online", "offline"]
    boot_id: str
    ts: float = Field(default_factory=now)
    version: str | None = None
    reason: str | None = None


class Hardware(Part):
    arch: str
    cpu_model: str | None = None
    cpu_count: int
    ram_mb: int
    board: str | None = None
    accelerators: list[str] = Field(default_factory=list)


class Capability(Part):
    """One thing a node can do for the realm (a task it accepts)."""

    name: str
    node: str
    backend: str | None = None
    model: str | None = None
    languages: list[str] = Field(default_factory=list)
    max_concurrency: int = Field(default=1, ge=1)
    streaming: bool = False
    attrs: dict[str, Any] = Field(default_factory=dict)


class NodeSummary(Part):
    name: str
    type: str
    status: Literal["starting", "running", "restarting", "failed", "stopped"]
    restarts: int = 0
    error: str | None = None


class NodeInfo(Message):
    """Capability advert: ``node/<id>/info``, retained, QoS 1."""

    TYPE = "node.info"

    node_id: str
    boot_id: str
    version: str
    hostname: str
    area: str | None = None
    hardware: Hardware
    nodes: list[NodeSummary] = Field(default_factory=list)
    capabilities: list[Capability] = Field(default_factory=list)
    workflows: list[str] = Field(
        default_factory=list, description="Local workflows this daemon runs (and answers for)."
    )
    ts: float = Field(default_factory=now)


class NodeHealth(Message):
    """Periodic health: ``node/<id>/health``, retained, QoS 0."""

    TYPE = "node.health"

    boot_id: str
    ts: float = Field(default_factory=now)
    uptime_s: float
    cpu_percent: float | None = None
    load: tuple[float, float, float] | None = None
    mem_percent: float | None = None
    mem_used_mb: int | None = None
    rss_mb: float | None = None
    temperature_c: float | None = None
    battery_percent: float | None = None
    active_tasks: int = 0
    queue_depth: int = 0
    nodes: list[NodeSummary] = Field(default_factory=list)


class Event(Message):
    """Something a node saw, heard or measured: ``event/<id>/<domain>/<name>``, QoS 1."""

    TYPE = "event"

    ts: float = Field(default_factory=now)
    value: Scalar = None
    unit: str | None = None
    device_class: str | None = None
    attrs: dict[str, Any] = Field(default_factory=dict)


class NodeCommand(Message):
    """A command to a node daemon: ``node/<id>/cmd/<command>`` (e.g. ``restart``)."""

    TYPE = "node.command"

    node: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
