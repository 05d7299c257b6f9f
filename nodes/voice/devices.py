"""What voice can act on: configured devices and scenes, and entities learned from the broker.

One :class:`Entity` per thing, whatever it came from: a ``devices:`` entry of
the config, or a Home Assistant MQTT discovery config (see
:mod:`nodes.voice.discovery`).  :func:`commands` turns an operation (on, off,
brightness, colour, position, temperature, percentage, press) into the MQTT
publishes that entity's payload schema expects.  :class:`Registry` holds them
all, configured ones first: a configured device overrides a discovered one
with the same name and area.  Pure: no bus, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from nodes.voice.config import Device, Scene

Component = Literal["light", "switch", "cover", "fan", "climate", "scene", "button"]
COMPONENTS: Final = frozenset({"light", "switch", "cover", "fan", "climate", "scene", "button"})
Op = Literal["on", "off", "brightness", "color", "position", "temperature", "percentage", "stop"]

# Named colours hassil's ``color`` list yields, as RGB.
COLORS: Final = {
    "white": (255, 255, 255), "black": (0, 0, 0), "red": (255, 0, 0), "orange": (255, 165, 0),
    "yellow": (255, 255, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "purple": (128, 0, 128),
    "brown": (165, 42, 42), "pink": (255, 192, 203), "turquoise": (64, 224, 208),
}  # fmt: skip


@dataclass(frozen=True)
class Action:
    """One MQTT publish an intent causes."""

    topic: str
    payload: str
    retain: bool = False


@dataclass(frozen=True)
class Availability:
    topic: str
    available: str = "online"
    not_available: str = "offline"


@dataclass(frozen=True)
class Entity:
    """A switchable thing: its spoken name, where it is, and how to command it."""

    key: str  # "config/<n>" or the discovery topic's "<component>/<node_id>/<object_id>"
    name: str
    component: Component
    area: str | None = None
    command_topic: str | None = None
    schema: Literal["default", "json", "config"] = "default"
    payloads: Mapping[str, str] = field(default_factory=dict)  # on, off, open, close, stop, press
    topics: Mapping[str, str] = field(default_factory=dict)  # brightness, rgb, position, ...
    brightness_scale: int = 255
    position_open: int = 100
    position_closed: int = 0
    speed_max: int = 100
    modes: tuple[str, ...] = ()
    state_topic: str | None = None
    availability: tuple[Availability, ...] = ()
    availability_all: bool = False  # availability_mode all (else any / latest)
    retain: bool = False
    source: Literal["config", "discovery"] = "discovery"

    @property
    def label(self) -> str:
        """How the answer names it: "bedroom lamp", "kitchen light"."""
        if self.area and not self.name.lower().startswith(self.area.lower()):
            return f"{self.area} {self.name}"
        return self.name


def from_config(index: int, device: Device) -> Entity:
    return Entity(
        key=f"config/{index}",
        name=device.name,
        component=device.component,
        area=device.area,
        command_topic=device.command_topic,
        schema="config",
        payloads={"on": device.payload_on, "off": device.payload_off, "set": device.payload_set},
        retain=device.retain,
        source="config",
    )


def from_scene(index: int, scene: Scene) -> Entity:
    return Entity(
        key=f"scene/{index}",
        name=scene.name,
        component="scene",
        command_topic=scene.command_topic,
        schema="config",
        payloads={"on": scene.payload},
        source="config",
    )


def _pct(value: float, top: int, bottom: int = 0) -> int:
    return round(bottom + (top - bottom) * max(0.0, min(100.0, value)) / 100)


def commands(entity: Entity, op: Op, value: float | str | None = None) -> list[Action]:
    """The publishes that do ``op`` on ``entity`` ([] when it cannot)."""
    p, t, retain = entity.payloads, entity.topics, entity.retain

    def on(topic: str | None, payload: str) -> list[Action]:
        return [Action(topic, payload, retain)] if topic else []

    if entity.schema == "config":  # a devices: entry: its three payloads
        if op in ("on", "off"):
            return on(entity.command_topic, p.get(op, ""))
        if op in ("brightness", "percentage", "position", "temperature") and value is not None:
            number = round(float(value)) if isinstance(value, float | int) else value
            return on(entity.command_topic, p.get("set", "{value}").replace("{value}", str(number)))
        return []
    comp = entity.component
    if comp == "light" and entity.schema == "json":
        body: dict[str, object] = {"state": "OFF" if op == "off" else "ON"}
        if op == "brightness" and isinstance(value, float | int):
            body["brightness"] = _pct(float(value), entity.brightness_scale)
        elif op == "color" and isinstance(value, str) and value in COLORS:
            r, g, b = COLORS[value]
            body["color"] = {"r": r, "g": g, "b": b}
        elif op not in ("on", "off"):
            return []
        return on(entity.command_topic, json.dumps(body, separators=(",", ":")))
    if comp == "light":
        if op in ("on", "off"):
            return on(entity.command_topic, p.get(op, "ON" if op == "on" else "OFF"))
        if op == "brightness" and isinstance(value, float | int):
            level = str(_pct(float(value), entity.brightness_scale))
            return on(t.get("brightness"), level)
        if op == "color" and isinstance(value, str) and value in COLORS:
            return on(t.get("rgb"), ",".join(str(c) for c in COLORS[value]))
        return []
    if comp in ("switch", "fan", "scene"):
        if op in ("on", "off") and not (comp == "scene" and op == "off"):
            return on(entity.command_topic, p.get(op, "ON" if op == "on" else "OFF"))
        if comp == "fan" and op == "percentage" and isinstance(value, float | int):
            return on(t.get("percentage"), str(_pct(float(value), entity.speed_max, 0)))
        return []
    if comp == "button":
        return on(entity.command_topic, p.get("press", "PRESS")) if op == "on" else []
    if comp == "cover":
        if op in ("on", "off", "stop"):
            key = {"on": "open", "off": "close", "stop": "stop"}[op]
            default = {"open": "OPEN", "close": "CLOSE", "stop": "STOP"}[key]
            return on(entity.command_topic, p.get(key, default))
        if op == "position" and isinstance(value, float | int):
            pos = _pct(float(value), entity.position_open, entity.position_closed)
            return on(t.get("position"), str(pos))
        return []
    if comp == "climate":
        if op == "temperature" and isinstance(value, float | int):
            return on(t.get("temperature"), f"{float(value):g}")
        if op == "off":
            return on(t.get("mode"), "off") or on(t.get("power"), p.get("off", "OFF"))
        if op == "on":
            mode = next((m for m in entity.modes if m != "off"), "heat")
            return on(t.get("power"), p.get("on", "ON")) or on(t.get("mode"), mode)
    return []


class Registry:
    """Every entity voice knows, configured first; a change bumps ``version``."""

    def __init__(self, configured: Iterable[Entity] = ()) -> None:
        self.configured = list(configured)
        self.discovered: dict[str, Entity] = {}
        self.version = 0
        # Learned from state and availability topics (keys of discovered entities).
        self.states: dict[str, str] = {}
        self.unavailable: set[str] = set()

    def learn(self, entity: Entity) -> bool:
        """Add or replace a discovered entity (False when nothing changed)."""
        if self.discovered.get(entity.key) == entity:
            return False
        self.discovered[entity.key] = entity
        self.version += 1
        return True

    def forget(self, key: str) -> Entity | None:
        gone = self.discovered.pop(key, None)
        if gone is not None:
            self.version += 1
        return gone

    def __iter__(self) -> Iterator[Entity]:
        """Configured entities, then discovered ones that no configured one overrides."""
        taken = {(e.name.lower(), (e.area or "").lower()) for e in self.configured}
        yield from self.configured
        # A copy (atomic under the GIL): a recognition on another thread may iterate
        # while the loop learns an entity.
        for e in list(self.discovered.values()):
            if (e.name.lower(), (e.area or "").lower()) not in taken:
                yield e

    def get(self, key: str) -> Entity | None:
        return next((e for e in self if e.key == key), None)

    def __len__(self) -> int:
        return sum(1 for _ in self)
