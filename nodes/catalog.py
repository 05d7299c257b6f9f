"""The node types, for callers that still import them from here (``daemon.runtime``).

The registry is :mod:`daemon.plugins`; each node package registers itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon import plugins

if TYPE_CHECKING:
    from daemon.node import Node


def node_class(type_name: str) -> type[Node]:
    """The implementation class of a node type (imported on first use)."""
    cls: type[Node] = plugins.node_class(type_name)
    return cls


def node_types() -> list[str]:
    """Every registered node type's name, sorted."""
    return sorted(plugins.node_types())
