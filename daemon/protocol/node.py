"""Node presence, capability adverts, health and events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from daemon.messages import Message, Part, now
from daemon.protocol.common import (
    MAX_ITEMS,
    MAX_LABEL,
    MAX_TEXT,
    Attrs,
    Label,
    Name,
    Text,
)
from daemon.protocol.task import CAPABILITY_RE

# An event's value: a reading, a state, a transcript (bounded like any free text).
Scalar = float | int | Annotated[str, Field(max_length=MAX_TEXT)] | bool | None
Version = Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=64)]


class NodeState(Message):
    """Birth and will: ``node/<id>/state``, retained, QoS 1.

    The offline will carries the same ``boot_id`` as the birth, so a stale
    will of an older boot can be told from the current one.
    """

    TYPE = "node.state"

    state: Literal["online", "offline"]
    boot_id: Name
    ts: float = Field(default_factory=now)
    version: Version | None = None
    reason: Text | None = None


class Hardware(Part):
    arch: Label
    cpu_model: Label | None = None
    cpu_count: int = Field(ge=0, le=1 << 20)
    ram_mb: int = Field(ge=0, le=1 << 40)
    board: Label | None = None
    accelerators: list[Label] = Field(default_factory=list, max_length=64)


class Capability(Part):
    """One thing a node can do for the realm (a task it accepts)."""

    name: str = Field(pattern=CAPABILITY_RE)
    node: Name
    backend: Name | None = None
    model: Label | None = None
    languages: list[Annotated[str, Field(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=64)]] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    max_concurrency: int = Field(default=1, ge=1, le=1 << 16)
    streaming: bool = False
    attrs: Attrs = Field(default_factory=dict)


class NodeSummary(Part):
    name: Name
    type: Name
    status: Literal["starting", "running", "restarting", "failed", "stopped"]
    restarts: int = Field(default=0, ge=0)
    error: Text | None = None


class BusStats(Part):
    """The daemon's broker connection (``daemon.bus.Bus.stats``)."""

    connects: int = Field(default=0, ge=0)
    dropped: int = Field(default=0, ge=0)  # publishes given up (see Bus.dropped)
    refused: int = Field(default=0, ge=0)  # publishes that could never be sent
    handler_errors: int = Field(default=0, ge=0)
    outbox: int = Field(default=0, ge=0)  # QoS 1/2 publishes not yet acknowledged
    outbox_bytes: int = Field(default=0, ge=0)
    inbox_dropped: int = Field(default=0, ge=0)  # incoming, dispatch too far behind


class SpoolStats(Part):
    """The daemon's event spool (``daemon.spool.EventSpool.stats``)."""

    events: int = Field(default=0, ge=0)  # events not yet acknowledged by the broker
    bytes: int = Field(default=0, ge=0)
    in_flight: int = Field(default=0, ge=0)  # of those, handed to the broker connection
    dropped: int = Field(default=0, ge=0)  # oldest unsent events dropped while it was full
    refused: int = Field(default=0, ge=0)  # events the broker refused (not kept)
    write_errors: int = Field(default=0, ge=0)  # failed disk writes (retried)
    last_seq: int = Field(default=0, ge=0)  # the seq of the newest event


class NodeInfo(Message):
    """Capability advert: ``node/<id>/info``, retained, QoS 1."""

    TYPE = "node.info"

    node_id: Name
    boot_id: Name
    version: Version
    hostname: Label
    area: Annotated[str, Field(max_length=MAX_LABEL)] | None = None
    hardware: Hardware
    nodes: list[NodeSummary] = Field(default_factory=list, max_length=MAX_ITEMS)
    capabilities: list[Capability] = Field(default_factory=list, max_length=MAX_ITEMS)
    workflows: list[Name] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Local workflows this daemon runs (and answers for).",
    )
    ts: float = Field(default_factory=now)


class NodeHealth(Message):
    """Periodic health: ``node/<id>/health``, retained, QoS 0."""

    TYPE = "node.health"
    VERSION = 2  # v2: spool

    boot_id: Name
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
    nodes: list[NodeSummary] = Field(default_factory=list, max_length=MAX_ITEMS)
    bus: BusStats | None = None
    spool: SpoolStats | None = None


class Event(Message):
    """Something a node saw, heard or measured: ``event/<id>/<domain>/<name>``.

    A node daemon stamps each with ``seq`` (per node id, +1 per event, never reused,
    across restarts) and ``boot_id`` (of the daemon run that made it) so consumers
    can tell gaps and duplicates (docs/protocol.md §6.1); other publishers may leave
    them out.
    """

    TYPE = "event"
    VERSION = 2  # v2: seq, boot_id

    seq: int | None = Field(default=None, ge=1, le=(1 << 63) - 1)
    boot_id: Name | None = None
    ts: float = Field(default_factory=now)
    value: Scalar = None
    unit: Label | None = None
    device_class: Name | None = None
    attrs: Attrs = Field(default_factory=dict)


class NodeCommand(Message):
    """A command to a node daemon: ``node/<id>/cmd/<command>`` (e.g. ``restart``)."""

    TYPE = "node.command"

    node: Name | None = None
    args: Attrs = Field(default_factory=dict)
