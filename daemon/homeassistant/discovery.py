"""Discovery payloads: an :class:`~daemon.entities.EntitySpec` → Home Assistant's config JSON.

Pure functions, no I/O, so every payload can be checked against the keys Home
Assistant's MQTT integration accepts (``tests/ha_discovery_schema.py``).
Full key names only (no abbreviations): the payloads are small and readable.

State topics carry the realm's JSON messages; a ``value_template`` extracts
the field (:attr:`EntitySpec.value_key`).  A JSON ``null`` renders as
``None``, which Home Assistant's MQTT sensors take as "unknown".
Availability follows the daemon's retained ``node/<id>/state``
(:class:`~daemon.protocol.node.NodeState` JSON): ``{{ value_json.state }}`` is
``online`` after the birth and ``offline`` after a clean stop or the will.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from daemon import __version__, topics
from daemon.entities import EntitySpec

MANUFACTURER: Final = "M-TOR"
ORIGIN_NAME: Final = "M-TOR"
# Home Assistant's discovery topic levels accept only these characters.
_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_-]")
# The command template turning what Home Assistant sends into an EntityCommand.
ENTITY_COMMAND_TEMPLATE: Final = '{"type":"entity.command","v":1,"value":{{ value | tojson }}}'
SWITCH_ON: Final = "ON"
SWITCH_OFF: Final = "OFF"
PRESS: Final = "PRESS"


def safe_id(text: str) -> str:
    """An id Home Assistant accepts in a discovery topic (``[a-zA-Z0-9_-]+``)."""
    return _UNSAFE.sub("_", text) or "_"


def jinja_str(value: Any) -> str:
    """How a JSON value renders through ``{{ value_json.x }}`` (Python's ``str``)."""
    return "None" if value is None else str(value)


def _literal(text: str) -> str:
    """A Jinja string literal (subscripts, not ``.x``: ``value_json.values`` is a method)."""
    return f"'{text}'" if "'" not in text and "\\" not in text else json.dumps(text)


def value_template(key: str | None, max_length: int | None = None) -> str | None:
    """``{{ value_json['a'][0] ... }}`` for ``a.0``; ``None`` when the payload is the value.

    Messages leave ``null`` fields out, so a missing first-level field renders
    ``None`` (Home Assistant: unknown) instead of failing the template.  With
    ``max_length`` the text is cut to it (Home Assistant refuses sensor states
    over 255 characters, e.g. a long transcript).
    """
    if key is None:
        return None
    parts = key.split(".")
    first = f"value_json[{_literal(parts[0])}]"
    rest = "".join(f"[{p}]" if p.isdigit() else f"[{_literal(p)}]" for p in parts[1:])
    value = f"{first}{rest}"
    if max_length is not None:
        value = f"({value} | string)[:{int(max_length)}]"
    return "{{ " + f"{value} if {first} is defined else None" + " }}"


@dataclass(frozen=True)
class Device:
    """Who publishes: one Home Assistant device (a node daemon or the realm)."""

    ha_node_id: str  # the <node_id> level of the discovery topic (safe_id)
    identifier: str  # unique and stable: mtor_<realm>_<node_id>
    name: str
    model: str
    area: str | None = None
    availability_topic: str | None = None  # a retained JSON message with "state"
    support_url: str | None = None

    def block(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "identifiers": [self.identifier],
            "name": self.name,
            "model": self.model,
            "manufacturer": MANUFACTURER,
            "sw_version": __version__,
        }
        if self.area:
            out["suggested_area"] = self.area
        return out

    def availability(self) -> list[dict[str, str]]:
        if self.availability_topic is None:
            return []
        return [
            {
                "topic": self.availability_topic,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]


def origin(support_url: str | None = None) -> dict[str, str]:
    out = {"name": ORIGIN_NAME, "sw_version": __version__}
    if support_url:
        out["support_url"] = support_url
    return out


def command_topic(spec: EntitySpec, realm: str, node_id: str) -> str | None:
    """Where the entity's commands go: its own topic, or the realm's entity-set topic."""
    if spec.command_topic is not None:
        return spec.command_topic
    if spec.on_command is not None:
        return topics.ENTITY_SET.build(realm=realm, node_id=node_id, object_id=spec.object_id)
    return None


# Components whose state is read from a JSON field of state_topic.
_STATEFUL: Final = frozenset(
    {"sensor", "binary_sensor", "switch", "select", "number", "text", "alarm_control_panel"}
)
_COMMANDED: Final = frozenset(
    {"switch", "button", "select", "number", "text", "alarm_control_panel"}
)
_WITH_DEVICE_CLASS: Final = frozenset({"sensor", "binary_sensor", "switch", "button", "number"})


def _component_keys(spec: EntitySpec) -> dict[str, Any]:
    """The keys particular to the entity's component."""
    comp = spec.component
    out: dict[str, Any] = {}
    if spec.unit and comp in ("sensor", "number"):
        out["unit_of_measurement"] = spec.unit
    if comp == "sensor":
        if spec.state_class:
            out["state_class"] = spec.state_class
        if spec.options:
            out["options"] = list(spec.options)
    elif comp == "binary_sensor":
        out["payload_on"] = jinja_str(spec.payload_on)
        out["payload_off"] = jinja_str(spec.payload_off)
    elif comp == "switch":
        out["state_on"] = jinja_str(spec.payload_on)
        out["state_off"] = jinja_str(spec.payload_off)
        out["payload_on"] = SWITCH_ON
        out["payload_off"] = SWITCH_OFF
    elif comp == "select":
        out["options"] = list(spec.options)
    elif comp == "camera" and spec.state_topic:
        out["topic"] = spec.state_topic
    elif comp == "image" and spec.state_topic:
        out["image_topic"] = spec.state_topic
        if spec.content_type:
            out["content_type"] = spec.content_type
    return out


def entity_config(
    spec: EntitySpec, device: Device, *, realm: str, node_id: str
) -> tuple[str, dict[str, Any]]:
    """The discovery ``(object_id, payload)`` of one entity."""
    object_id = safe_id(spec.object_id)
    cfg: dict[str, Any] = {
        "name": spec.name,
        "unique_id": f"{device.identifier}_{object_id}",
        "device": device.block(),
        "origin": origin(device.support_url),
    }
    if not spec.always_available and device.availability():
        cfg["availability"] = device.availability()
    if spec.diagnostic:
        cfg["entity_category"] = "diagnostic"
    if spec.icon:
        cfg["icon"] = spec.icon
    comp = spec.component
    if comp in _STATEFUL and spec.state_topic:
        cfg["state_topic"] = spec.state_topic
        template = value_template(spec.value_key, spec.max_length)
        if template:
            cfg["value_template"] = template
    if spec.device_class and comp in _WITH_DEVICE_CLASS:
        cfg["device_class"] = spec.device_class
    cfg.update(_component_keys(spec))
    cmd = command_topic(spec, realm, node_id)
    if cmd is not None and comp in _COMMANDED:
        cfg["command_topic"] = cmd
        if spec.command_topic is None:  # managed by the bridge: an EntityCommand
            cfg["command_template"] = ENTITY_COMMAND_TEMPLATE
            if comp == "button":
                cfg["payload_press"] = PRESS
    cfg.update(spec.extra)
    return object_id, cfg


# What Home Assistant refuses a config without (per component).
REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "sensor": ("state_topic",),
    "binary_sensor": ("state_topic",),
    "switch": ("command_topic",),
    "button": ("command_topic",),
    "select": ("command_topic", "options"),
    "number": ("command_topic",),
    "text": ("command_topic",),
    "camera": ("topic",),
    "image": ("image_topic",),
    "alarm_control_panel": ("command_topic", "state_topic"),
    "device_tracker": ("json_attributes_topic",),  # where it is: from its attributes
}


def missing(component: str, cfg: dict[str, Any]) -> list[str]:
    """Keys Home Assistant requires that ``cfg`` lacks (an entity it would refuse)."""
    return [key for key in REQUIRED.get(component, ()) if not cfg.get(key)]


def discovery_topic(prefix: str, component: str, device: Device, object_id: str) -> str:
    return topics.ha_discovery(prefix, component, device.ha_node_id, object_id)
