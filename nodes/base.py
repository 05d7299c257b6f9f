"""The config base every node type extends (it lives in :mod:`daemon.plugins`,
where the core can name it without importing a node type)."""

from daemon.plugins import NodeConfigBase

__all__ = ["NodeConfigBase"]
