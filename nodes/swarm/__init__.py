"""The swarm node: a robot or drone as a realm member (docs/swarm.md).

Registers the ``swarm`` node type.  It is never offered by itself (a machine is
not a robot because it could run one): a config names it, with its driver
(``sim`` or ``mavlink``).
"""

from daemon.plugins import register_node_type
from nodes.swarm.config import SwarmConfig

register_node_type("swarm", SwarmConfig, "nodes.swarm.node:SwarmNode")
