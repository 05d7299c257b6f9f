"""The sensors node: host metrics, command sensors and file (sysfs / 1-wire) sensors.

Registers the ``sensors`` node type; it works on any Linux machine, so it is
always offered.
"""

from daemon.plugins import Offer, register_node_type
from nodes.sensors.config import SensorsConfig


def _offer() -> Offer:
    return Offer(SensorsConfig())


register_node_type("sensors", SensorsConfig, "nodes.sensors.node:SensorsNode", _offer)
