"""Reference capabilities without a model (``echo``, ``sleep``) for tests and benchmarks.

Registers the ``reference`` node type; it needs nothing, so it is always offered.
"""

from daemon.plugins import Offer, register_node_type
from nodes.reference.config import ReferenceConfig


def _offer() -> Offer:
    return Offer(ReferenceConfig())


register_node_type("reference", ReferenceConfig, "nodes.reference.node:ReferenceNode", _offer)
