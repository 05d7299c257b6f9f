"""Entities: what a node exposes for dashboards and Home Assistant to show and control.

A node lists its entities in :meth:`daemon.node.Node.entities`; the Home
Assistant bridge (``daemon.homeassistant``) turns each into an MQTT discovery
config.  The spec says *what* the entity is and *which realm topics* carry its
state and commands; it knows nothing of Home Assistant's payload shape, so
other consumers (``mtor status``, a web UI) can use it too.

State topics carry the realm's JSON messages (an :class:`~daemon.protocol.node.Event`
has its reading in ``value``): ``value_key`` names the JSON field holding the
state (default ``value``); ``None`` means the payload is the plain value.
A dotted key reaches into nested JSON (``load.0`` is the first item of ``load``).

Commands: an entity with ``on_command`` is controllable.  Its commands arrive
as an :class:`EntityCommand` on ``command_topic`` (by default
``node/<node_id>/entity/<object_id>/set``); the consumer that routes them
(the Home Assistant bridge) validates the value for the component (a switch
gets ``payload_on``/``payload_off``, a number a float in range, a select one of
``options``, a button ``None``) and awaits ``on_command(value)``.  The node
then publishes the new state on ``state_topic``: that is the report back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.messages import Message

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
    "device_tracker",
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
    always_available: bool = False  # True: not tied to the daemon being online (its state)
    icon: str | None = None
    command_topic: str | None = None  # where commands go (switch, button, select, ...)
    payload_on: Any = True  # binary_sensor/switch: the state values meaning on/off
    payload_off: Any = False
    options: tuple[str, ...] = ()  # select: the choices
    content_type: str | None = None  # camera/image: e.g. image/jpeg
    max_length: int | None = None  # text states are cut to this (HA refuses sensor states > 255)
    # What it measures when two entities could (``host.load``, ``host.memory``,
    # ``host.temperature``): the daemon's own diagnostic gives way to a node's.
    measures: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # anything component-specific
    # Called with the validated value of a command (see the module docstring).
    on_command: Callable[[Any], Awaitable[None]] | None = field(default=None, compare=False)


class EntityCommand(Message):
    """A command to a controllable entity (``node/<id>/entity/<object_id>/set``).

    ``value`` is the raw command: ``"ON"``/``"OFF"`` for a switch, a number,
    an option, text; ``"PRESS"`` (or anything) for a button.
    """

    TYPE = "entity.command"

    value: float | int | str | bool | None = None
