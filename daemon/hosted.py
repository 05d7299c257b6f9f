"""A node as its daemon hosts it: its supervised job, the node object once made,
the task running it, and whether its setup is done."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from daemon.node import Node
from daemon.supervisor import Supervised


@dataclass
class HostedNode:
    name: str
    type_name: str
    job: Supervised
    node: Node | None = None
    task: asyncio.Task[None] | None = None
    ready: bool = False
