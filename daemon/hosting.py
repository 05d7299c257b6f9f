"""What the node daemon hosts, and what its parts see of it: a node as its daemon
hosts it (:class:`HostedNode`, with what its crash guard says of it), and the
port the daemon's own parts (its Home Assistant device, its local workflows)
take instead of the whole daemon (:class:`DaemonPort`; each part's port adds
what it needs)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from daemon.node import Node
from daemon.supervisor import Supervised

if TYPE_CHECKING:
    from daemon.bus import Bus
    from daemon.config import Config
    from daemon.worker import Executor


@dataclass
class HostedNode:
    """A node as its daemon hosts it: its supervised job, the node object once made,
    the task running it, and whether its setup is done."""

    name: str
    type_name: str
    job: Supervised
    node: Node | None = None
    task: asyncio.Task[None] | None = None
    ready: bool = False
    # What the daemon's crash guard says of it (daemon.probe): the backend it runs
    # without, or why it is not loaded; shown as its error while it runs.
    note: str | None = None
    # The node as the worker's executor (its tasks counted for the crash guard).
    executor: Executor | None = None


class DaemonPort(Protocol):
    """The node daemon's identity, configuration and bus
    (:class:`daemon.runtime.NodeDaemon` is one)."""

    @property
    def config(self) -> Config: ...

    @property
    def node_id(self) -> str: ...

    @property
    def bus(self) -> Bus: ...
