"""The keys Home Assistant's MQTT integration requires and accepts, per component.

Taken from Home Assistant's MQTT integration (``homeassistant/components/mqtt``:
``schemas.py`` MQTT_ENTITY_COMMON_SCHEMA / availability / device / origin,
``config.py`` MQTT_BASE/RO/RW schemas, and each platform's
``PLATFORM_SCHEMA_MODERN``) and its documentation pages
(``integrations/<component>.mqtt``).  Home Assistant itself drops unknown keys
silently (``extra=REMOVE_EXTRA``); here an unknown key is an error, so a
misspelt key cannot go unnoticed.  Abbreviations are not accepted: M-TOR
publishes full key names only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jinja2

# MQTT_BASE_SCHEMA
_BASE = {"qos", "encoding", "group"}
# MQTT_AVAILABILITY_SCHEMA (single + list forms)
_AVAILABILITY = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "payload_available",
    "payload_not_available",
}
# MQTT_ENTITY_COMMON_SCHEMA (+ "platform", used by device-based discovery)
_COMMON = (
    _BASE
    | _AVAILABILITY
    | {
        "device",
        "origin",
        "enabled_by_default",
        "entity_category",
        "entity_picture",
        "icon",
        "json_attributes_topic",
        "json_attributes_template",
        "object_id",
        "default_entity_id",
        "unique_id",
        "platform",
        "name",
    }
)
_RO = {"state_topic", "value_template"}
_RW = {"command_topic", "optimistic", "retain", "state_topic"}

# component -> (required keys, accepted keys besides the common ones)
COMPONENTS: dict[str, tuple[set[str], set[str]]] = {
    # device_tracker: a location from json_attributes (latitude, longitude, gps_accuracy)
    # or a state (home / not_home / a zone) from state_topic.
    "device_tracker": (
        set(),
        _RO | {"payload_home", "payload_not_home", "payload_reset", "source_type"},
    ),
    "sensor": (
        {"state_topic"},
        _RO
        | {
            "device_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "options",
            "suggested_display_precision",
            "state_class",
            "unit_of_measurement",
        },
    ),
    "binary_sensor": (
        {"state_topic"},
        _RO
        | {
            "device_class",
            "expire_after",
            "force_update",
            "off_delay",
            "payload_off",
            "payload_on",
        },
    ),
    "button": (
        {"command_topic"},
        {"command_template", "command_topic", "device_class", "payload_press", "retain"},
    ),
    "switch": (
        {"command_topic"},
        _RW
        | {
            "command_template",
            "device_class",
            "payload_off",
            "payload_on",
            "state_off",
            "state_on",
            "value_template",
        },
    ),
    "select": (
        {"command_topic", "options"},
        _RW | {"command_template", "options", "value_template"},
    ),
    "number": (
        {"command_topic"},
        _RW
        | {
            "command_template",
            "device_class",
            "max",
            "min",
            "mode",
            "payload_reset",
            "step",
            "unit_of_measurement",
            "value_template",
        },
    ),
    "text": (
        {"command_topic"},
        _RW | {"command_template", "max", "min", "mode", "pattern", "value_template"},
    ),
    "camera": ({"topic"}, {"topic", "image_encoding"}),
    "image": (
        set(),
        {"content_type", "image_topic", "url_topic", "image_encoding", "url_template"},
    ),
    "alarm_control_panel": (
        {"command_topic", "state_topic"},
        {
            "supported_features",
            "code",
            "code_arm_required",
            "code_disarm_required",
            "code_trigger_required",
            "command_template",
            "command_topic",
            "payload_arm_away",
            "payload_arm_home",
            "payload_arm_night",
            "payload_arm_vacation",
            "payload_arm_custom_bypass",
            "payload_disarm",
            "payload_trigger",
            "retain",
            "state_topic",
            "value_template",
        },
    ),
}

DEVICE_KEYS = {
    "identifiers",
    "connections",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "hw_version",
    "serial_number",
    "sw_version",
    "via_device",
    "suggested_area",
    "configuration_url",
}
ORIGIN_REQUIRED = {"name"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_ITEM_REQUIRED = {"topic"}
AVAILABILITY_ITEM_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
ENTITY_CATEGORIES = {"config", "diagnostic"}
ALARM_FEATURES = {
    "arm_home",
    "arm_away",
    "arm_night",
    "arm_vacation",
    "arm_custom_bypass",
    "trigger",
}
NUMBER_MODES = {"auto", "box", "slider"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
# Keys whose values Home Assistant validates as strings (cv.string).
_STRING_KEYS = {
    "name",
    "payload_on",
    "payload_off",
    "state_on",
    "state_off",
    "payload_press",
    "payload_available",
    "payload_not_available",
    "unit_of_measurement",
    "unique_id",
}
_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_TOPIC = re.compile(r"^[^+#\0]+$")


def _check_topic(problems: list[str], key: str, value: Any) -> None:
    if not isinstance(value, str) or not value or not _TOPIC.match(value):
        problems.append(f"{key}: not a valid topic: {value!r}")


def problems(component: str, payload: dict[str, Any]) -> list[str]:
    """Everything wrong with one discovery payload (empty: valid)."""
    if component not in COMPONENTS:
        return [f"unknown component {component!r}"]
    required, accepted = COMPONENTS[component]
    out: list[str] = []
    for key in sorted(required - payload.keys()):
        out.append(f"missing required key {key!r}")
    for key in sorted(payload.keys() - accepted - _COMMON):
        out.append(f"key {key!r} is not accepted by a {component}")
    if "availability" in payload and "availability_topic" in payload:
        out.append("availability and availability_topic are exclusive")
    if component == "image" and ("image_topic" in payload) == ("url_topic" in payload):
        out.append("an image needs exactly one of image_topic, url_topic")
    for key in ("state_topic", "command_topic", "topic", "image_topic", "json_attributes_topic"):
        if key in payload:
            _check_topic(out, key, payload[key])
    for key in _STRING_KEYS & payload.keys():
        if not isinstance(payload[key], str):
            out.append(f"{key} must be a string, got {payload[key]!r}")
    if "unique_id" not in payload:
        out.append("unique_id is required by M-TOR (a device block needs it)")
    if payload.get("entity_category", "config") not in ENTITY_CATEGORIES:
        out.append(f"entity_category {payload['entity_category']!r}")
    if "state_class" in payload and payload["state_class"] not in STATE_CLASSES:
        out.append(f"state_class {payload['state_class']!r}")
    if component == "number" and payload.get("mode", "auto") not in NUMBER_MODES:
        out.append(f"number mode {payload['mode']!r}")
    if component == "alarm_control_panel":
        bad = set(payload.get("supported_features", [])) - ALARM_FEATURES
        if bad:
            out.append(f"unknown alarm features {sorted(bad)}")
    if component == "select" and not payload.get("options"):
        out.append("a select needs a non-empty options list")
    out.extend(_device_problems(payload))
    return out


def _device_problems(payload: dict[str, Any]) -> list[str]:
    out: list[str] = []
    device = payload.get("device")
    if device is not None:
        for key in sorted(device.keys() - DEVICE_KEYS):
            out.append(f"device key {key!r} is not accepted")
        if not device.get("identifiers") and not device.get("connections"):
            out.append("device needs identifiers or connections")
    origin = payload.get("origin")
    if origin is not None:
        for key in sorted(ORIGIN_REQUIRED - origin.keys()):
            out.append(f"origin misses {key!r}")
        for key in sorted(origin.keys() - ORIGIN_KEYS):
            out.append(f"origin key {key!r} is not accepted")
    for item in payload.get("availability", []):
        for key in sorted(AVAILABILITY_ITEM_REQUIRED - item.keys()):
            out.append(f"availability item misses {key!r}")
        for key in sorted(item.keys() - AVAILABILITY_ITEM_KEYS):
            out.append(f"availability item key {key!r} is not accepted")
        _check_topic(out, "availability.topic", item.get("topic"))
    return out


def valid_ids(topic_node_id: str, object_id: str) -> bool:
    """Home Assistant only discovers ``<node_id>``/``<object_id>`` of these characters."""
    return bool(_ID.match(topic_node_id) and _ID.match(object_id))


def render(template: str, payload: bytes | str, **variables: Any) -> str:
    """Render like Home Assistant: ``value`` is the payload, ``value_json`` its JSON."""
    text = payload.decode() if isinstance(payload, bytes) else payload
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    context = {"value": text, "value_json": parsed, **variables}
    return env.from_string(template).render(**context)
