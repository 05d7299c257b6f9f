"""Local intents: config-driven templates that turn a transcript into an action.

Templates (matched on a normalised transcript: lower case, no punctuation):

* ``turn|switch on|off [the] [<area>] <device>`` and ``turn [the] [<area>] <device> on|off``
* ``set [the] [<area>] <device> to <value> [percent|%]``
* ``activate|start|turn on [the] <scene> [scene]`` and ``<scene> scene``
* ``what time is it`` / ``what's the time``

An action is an MQTT publish to the device's configured command topic
(zigbee2mqtt ``zigbee2mqtt/<device>/set``, a Home Assistant MQTT entity's
command topic, ...).  No match: ``None`` — the pipeline asks the realm.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from nodes.voice.config import Device, IntentConfig

LEADING_JUNK: Final = 2  # words before a command that may be skipped
NEGATIONS: Final = frozenset({"dont", "do", "not", "never", "no", "cant", "stop"})

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}  # fmt: skip


@dataclass(frozen=True)
class Action:
    topic: str
    payload: str
    retain: bool = False


@dataclass
class Intent:
    name: str  # turn_on, turn_off, set, scene, time
    speech: str  # what the satellite says back
    actions: list[Action] = field(default_factory=list)
    slots: dict[str, str] = field(default_factory=dict)


def normalise(text: str) -> str:
    text = text.lower().replace("%", " percent ").replace("'", "")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _alt(names: list[str]) -> str:
    # Longest first, so "ceiling light" wins over "light"; optional plural "s".
    escaped = sorted({re.escape(normalise(n)) for n in names if n}, key=len, reverse=True)
    return "(?:" + "|".join(escaped) + ")s?" if escaped else "(?!x)x"


class IntentRecognizer:
    def __init__(self, cfg: IntentConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        areas = _alt([d.area or "" for d in cfg.devices])
        devices = _alt([d.name for d in cfg.devices])
        target = rf"(?:the )?(?:(?P<area>{areas}) )?(?P<device>{devices})"
        on_off = r"(?P<state>on|off)"
        self._switch = [
            re.compile(rf"^(?:please )?(?:turn|switch) {on_off} {target}(?: please)?$"),
            re.compile(rf"^(?:please )?(?:turn|switch) {target} {on_off}(?: please)?$"),
        ]
        value = r"(?P<value>[0-9]+|[a-z]+(?: [a-z]+)?)"
        self._set = re.compile(rf"^(?:please )?set {target} to {value}(?: percent)?(?: please)?$")
        scenes = _alt([s.name for s in cfg.scenes])
        self._scene = [
            re.compile(
                rf"^(?:activate|start|turn on|run) (?:the )?(?P<scene>{scenes})(?: scene)?$"
            ),
            re.compile(rf"^(?P<scene>{scenes}) scene$"),
        ]
        self._time = re.compile(
            r"^(?:what time is it|whats the time|what is the time|tell me the time)(?: now)?$"
        )

    def recognize(self, transcript: str) -> Intent | None:
        words = normalise(transcript).split()
        # A filler or a stray token before the command ("uh", "okay", a "2." whisper
        # made of the wake word's tail) does not hide it: up to LEADING_JUNK words
        # are skipped, the rest must match a template whole.
        for skip in range(min(LEADING_JUNK, max(len(words) - 1, 0)) + 1):
            if NEGATIONS.intersection(words[:skip]):
                break  # "don't turn on the light" is not "turn on the light"
            intent = self._match(" ".join(words[skip:]))
            if intent is not None:
                return intent
        return None

    def _match(self, text: str) -> Intent | None:
        if not text:
            return None
        for pattern in self._switch:
            if m := pattern.match(text):
                return self._switch_intent(m)
        if m := self._set.match(text):
            return self._set_intent(m)
        for pattern in self._scene:
            if m := pattern.match(text):
                return self._scene_intent(m.group("scene"))
        if self.cfg.time and self._time.match(text):
            now = time.localtime(self.clock())
            hour = now.tm_hour % 12 or 12
            half = "AM" if now.tm_hour < 12 else "PM"
            return Intent("time", f"It is {hour}:{now.tm_min:02d} {half}.")
        return None

    def _find(self, area: str | None, name: str) -> Device | None:
        name = name.removesuffix("s") if name not in self._names() else name
        matches = [
            d
            for d in self.cfg.devices
            if normalise(d.name) in (name, name + "s", name.removesuffix("s"))
            and (area is None or normalise(d.area or "") in (area, area.removesuffix("s")))
        ]
        return matches[0] if len(matches) == 1 else None

    def _names(self) -> set[str]:
        return {normalise(d.name) for d in self.cfg.devices}

    def _switch_intent(self, m: re.Match[str]) -> Intent | None:
        device = self._find(m.group("area"), m.group("device"))
        if device is None:
            return None
        on = m.group("state") == "on"
        label = _label(device)
        return Intent(
            "turn_on" if on else "turn_off",
            f"Turned {'on' if on else 'off'} the {label}.",
            [Action(device.command_topic, device.payload_on if on else device.payload_off,
                    device.retain)],
            {"device": device.name, "area": device.area or ""},
        )  # fmt: skip

    def _set_intent(self, m: re.Match[str]) -> Intent | None:
        device = self._find(m.group("area"), m.group("device"))
        raw = m.group("value")
        value = raw if raw.isdigit() else _words_to_number(raw)
        if device is None or value is None:
            return None
        label = _label(device)
        payload = device.payload_set.replace("{value}", str(value))
        return Intent(
            "set",
            f"Set the {label} to {value}.",
            [Action(device.command_topic, payload, device.retain)],
            {"device": device.name, "area": device.area or "", "value": str(value)},
        )

    def _scene_intent(self, spoken: str) -> Intent | None:
        for scene in self.cfg.scenes:
            if normalise(scene.name) in (spoken, spoken.removesuffix("s")):
                return Intent(
                    "scene",
                    f"Activated {scene.name}.",
                    [Action(scene.command_topic, scene.payload)],
                    {"scene": scene.name},
                )
        return None


def _label(device: Device) -> str:
    return f"{device.area} {device.name}" if device.area else device.name


def _words_to_number(words: str) -> str | None:
    total = 0
    for word in words.split():
        if word not in _NUMBER_WORDS:
            return None
        total += _NUMBER_WORDS[word]
    return str(total)
