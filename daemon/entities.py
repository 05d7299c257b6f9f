"""Entities: what a node exposes for dashboards and Home Assistant to show and control.

A node lists its entities in :meth:`daemon.node.Node.entities`; the Home
Assistant bridge (``daemon.homeassistant``) turns each into an MQTT discovery
config.  The spec says *what* the entity is and *which realm topics* carry its
state and commands; it knows nothing of Home Assistant's payload shape, so
other consumers (``mtor status``, a web UI) can use it too.

State topics carry the realm's JSON messages (an :class:`~daemon.protocol.node.Event`
has its reading in ``value``): ``value_key`` names the JSON field holding the
state (default ``value``); ``None`` means the payload is the plain value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Component = Literal[
    "sensor",
    "binary_sensor",
    "switch",
    "button",
    "select",
    "number",
    "camera",
    "image",
    "alarm_control_panel",
    "text",
]


@dataclass(frozen=True)
class EntitySpec:
    """One entity of a node (e.g. a temperature sensor, a motion binary sensor)."""

    component: Component
    object_id: str  # unique within the node daemon: [a-z0-9_]
    name: str  # human name, e.g. "Porch motion"
    state_topic: str | None = None  # full realm topic (built with daemon.topics)
    value_key: str | None = "value"  # JSON field with the state; None: payload is the value
    device_class: str | None = None  # HA device class (temperature, motion, ...)
    unit: str | None = None
    state_class: str | None = None  # measurement, total, total_increasing
    diagnostic: bool = False  # health/technical entities (HA entity_category: diagnostic)
    icon: str | None = None
    command_topic: str | None = None  # where commands go (switch, button, select, ...)
    payload_on: Any = True  # binary_sensor/switch: the state values meaning on/off
    payload_off: Any = False
    options: tuple[str, ...] = ()  # select: the choices
    content_type: str | None = None  # camera/image: e.g. image/jpeg
    extra: dict[str, Any] = field(default_factory=dict)  # anything component-specific
