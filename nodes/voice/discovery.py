"""Home Assistant MQTT discovery configs → :class:`~nodes.voice.devices.Entity`.

What zigbee2mqtt, Tasmota, ESPHome and other bridges publish, retained, on
``<prefix>/<component>/[<node_id>/]<object_id>/config``: abbreviated keys
(``cmd_t``, ``stat_t``, ``pl_on``, ``dev.sa``, ...) are expanded and ``~`` is
replaced by the base topic, as Home Assistant does.  A device-based config
(``<prefix>/device/<id>/config`` with ``cmps``) yields one entity per
component.  The name is the entity's ``name``, or the device's when that is
null (the zigbee2mqtt convention for a device's main entity); the area is the
device's ``suggested_area``.

Everything here is hostile input: sizes, counts and nesting are bounded, a
bad config is refused with a reason (the caller logs one line) and never
raises.  Pure functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from daemon.textcheck import json_too_deep, valid_topic_name
from nodes.voice.devices import COMPONENTS, Availability, Component, Entity

MAX_CONFIG_BYTES: Final = 16_384  # zigbee2mqtt's biggest (a thermostat) is ~4 KiB
MAX_ENTITIES: Final = 2_000  # discovered entities remembered per satellite
MAX_DEVICE_COMPONENTS: Final = 64  # components of one device-based config
MAX_NAME: Final = 100
MAX_AVAILABILITY: Final = 8

# Home Assistant's abbreviations (homeassistant/components/mqtt/abbreviations.py),
# the ones voice reads.
ABBREVIATIONS: Final = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "bri_cmd_t": "brightness_command_topic", "bri_scl": "brightness_scale",
    "cmd_t": "command_topic", "dev": "device", "name": "name", "obj_id": "object_id",
    "pl_avail": "payload_available", "pl_not_avail": "payload_not_available",
    "pl_on": "payload_on", "pl_off": "payload_off", "pl_open": "payload_open",
    "pl_cls": "payload_close", "pl_stop": "payload_stop", "pl_prs": "payload_press",
    "pos_open": "position_open", "pos_clsd": "position_closed",
    "set_pos_t": "set_position_topic", "stat_t": "state_topic", "schema": "schema",
    "rgb_cmd_t": "rgb_command_topic", "pct_cmd_t": "percentage_command_topic",
    "spd_rng_max": "speed_range_max", "temp_cmd_t": "temperature_command_topic",
    "mode_cmd_t": "mode_command_topic", "modes": "modes", "pow_cmd_t": "power_command_topic",
    "ret": "retain", "uniq_id": "unique_id", "cmps": "components", "p": "platform",
    "t": "topic", "o": "origin",
}  # fmt: skip
DEVICE_ABBREVIATIONS: Final = {"sa": "suggested_area", "ids": "identifiers", "mdl": "model"}
TOPIC_KEYS: Final = {  # discovery key → Entity.topics key
    "brightness_command_topic": "brightness", "rgb_command_topic": "rgb",
    "set_position_topic": "position", "percentage_command_topic": "percentage",
    "temperature_command_topic": "temperature", "mode_command_topic": "mode",
    "power_command_topic": "power",
}  # fmt: skip
PAYLOAD_KEYS: Final = {
    "payload_on": "on", "payload_off": "off", "payload_open": "open",
    "payload_close": "close", "payload_stop": "stop", "payload_press": "press",
}  # fmt: skip


@dataclass(frozen=True)
class Refused:
    """A config that was not understood or not accepted, and why (one log line)."""

    reason: str


@dataclass(frozen=True)
class Forget:
    """An empty retained config: the entity is gone."""

    key: str


def _expand(data: dict[str, Any], table: Mapping[str, str]) -> dict[str, Any]:
    return {table.get(k, k): v for k, v in data.items()}


def _tilde(data: dict[str, Any]) -> dict[str, Any]:
    """Replace ``~`` at the start or end of a topic by the base topic (HA's rule)."""
    base = data.get("~")
    if not isinstance(base, str):
        return data
    out = dict(data)
    for key, value in data.items():
        if isinstance(value, str) and (key.endswith("_topic") or key == "topic"):
            if value.startswith("~"):
                out[key] = base + value[1:]
            elif value.endswith("~"):
                out[key] = value[:-1] + base
    return out


def _text(value: Any, limit: int = MAX_NAME) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable():
        return value.strip() or None
    return None


def _payload(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}"
    if isinstance(value, str) and len(value) <= 256:
        return value
    return None


def _topic(value: Any) -> str | None:
    return value if isinstance(value, str) and valid_topic_name(value) else None


def _int(value: Any, default: int, low: int = 1, high: int = 100_000) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    return default


def parse(key: str, component: str, payload: bytes) -> Entity | list[Entity] | Forget | Refused:
    """One discovery message: ``key`` is ``<component>/<node_id>/<object_id>``."""
    if not payload:
        return Forget(key)
    if len(payload) > MAX_CONFIG_BYTES:
        return Refused(f"{len(payload)} bytes (at most {MAX_CONFIG_BYTES})")
    if json_too_deep(payload):
        return Refused("nested too deep")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Refused(f"not JSON: {str(exc)[:80]}")
    if not isinstance(data, dict):
        return Refused("not a JSON object")
    if component == "device":
        return _device_based(key, data)
    if component not in COMPONENTS:
        return Refused(f"component {component!r} is not one voice commands")
    return _entity(key, cast(Component, component), data)


def _device_based(key: str, data: dict[str, Any]) -> list[Entity] | Refused:
    data = _expand(data, ABBREVIATIONS)
    parts = data.get("components")
    if not isinstance(parts, dict) or len(parts) > MAX_DEVICE_COMPONENTS:
        return Refused("device config without a bounded 'components' object")
    shared = {k: v for k, v in data.items() if k not in ("components", "origin")}
    out: list[Entity] = []
    for cid, raw in parts.items():
        if not isinstance(raw, dict) or not isinstance(cid, str):
            continue
        part = _expand(raw, ABBREVIATIONS)
        platform = part.get("platform")
        if platform not in COMPONENTS:
            continue
        entity = _entity(f"{key}/{cid}"[:300], platform, {**shared, **part})
        if isinstance(entity, Entity):
            out.append(entity)
    return out


def _entity(key: str, component: Component, raw: dict[str, Any]) -> Entity | Refused:
    data = _tilde(_expand(raw, ABBREVIATIONS))
    device = data.get("device")
    device = _expand(device, DEVICE_ABBREVIATIONS) if isinstance(device, dict) else {}
    # zigbee2mqtt's main entity of a device has name null: it is called by the device's name.
    name = _text(data.get("name")) or _text(device.get("name"))
    if name is None:
        return Refused("no name (neither the entity's nor its device's)")
    command = _topic(data.get("command_topic"))
    topics_: dict[str, str] = {}
    for long, short in TOPIC_KEYS.items():
        if (topic := _topic(data.get(long))) is not None:
            topics_[short] = topic
    if command is None and not topics_:
        return Refused("no command topic")
    payloads: dict[str, str] = {}
    for long, short in PAYLOAD_KEYS.items():
        if long in data and (value := _payload(data[long])) is not None:
            payloads[short] = value
    modes = data.get("modes")
    return Entity(
        key=key,
        name=name,
        component=component,
        area=_text(device.get("suggested_area")),
        command_topic=command,
        schema="json" if data.get("schema") == "json" else "default",
        payloads=payloads,
        topics=topics_,
        brightness_scale=_int(data.get("brightness_scale"), 255),
        position_open=_int(data.get("position_open"), 100, 0),
        position_closed=_int(data.get("position_closed"), 0, 0),
        speed_max=_int(data.get("speed_range_max"), 100),
        modes=tuple(m for m in modes[:16] if isinstance(m, str)) if isinstance(modes, list) else (),
        state_topic=_topic(data.get("state_topic")),
        availability=_availability(data),
        availability_all=data.get("availability_mode") == "all",
        retain=data.get("retain") is True,
    )


def _availability(data: dict[str, Any]) -> tuple[Availability, ...]:
    on = _payload(data.get("payload_available")) or "online"
    off = _payload(data.get("payload_not_available")) or "offline"
    out: list[Availability] = []
    if (topic := _topic(data.get("availability_topic"))) is not None:
        out.append(Availability(topic, on, off))
    entries = data.get("availability")
    if isinstance(entries, list):
        for raw in entries[:MAX_AVAILABILITY]:
            if not isinstance(raw, dict):
                continue
            entry = _tilde({**_expand(raw, ABBREVIATIONS), "~": data.get("~")})
            if (topic := _topic(entry.get("topic"))) is not None:
                out.append(
                    Availability(
                        topic,
                        _payload(entry.get("payload_available")) or on,
                        _payload(entry.get("payload_not_available")) or off,
                    )
                )
    return tuple(out)
