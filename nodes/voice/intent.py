"""Local intents: Home Assistant's sentences (hassil + home-assistant-intents) → an action.

The sentence templates are Home Assistant's own, for 65 languages
(``home-assistant-intents``), matched by ``hassil`` against slot lists built
from what this satellite can act on (:class:`~nodes.voice.devices.Registry`:
configured devices and scenes, and entities learned from discovery configs on
the broker).  Supported: turn on/off (lights, switches, fans, covers, scenes,
buttons, climate), brightness and colour, cover positions, climate
temperature, fan speed, get state, timers, broadcast, time and date, never
mind.

An :class:`Intent` says what to publish (:class:`Action`) and what to say;
timers and broadcasts are requests the satellite carries out
(:class:`TimerRequest`, ``broadcast``).  A sentence that matched an intent
but named nothing here (``target_missing``) or matched nothing gives
``None``: the pipeline asks the realm's chat ("prefer local").  Answers are
English sentences; recognition is in ``intents.language``.

Pure and synchronous (no bus); a recognition takes a few milliseconds, so the
pipeline runs it off the event loop.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from nodes.voice.config import IntentConfig
from nodes.voice.devices import Action, Entity, Op, Registry, commands, from_config, from_scene

log = logging.getLogger(__name__)

__all__ = ["Action", "Intent", "IntentRecognizer", "IntentsUnavailable", "TimerRequest"]

# Home Assistant intents voice carries out; the rest (media, vacuum, lists,
# weather) are not loaded, which also keeps recognition fast.
SUPPORTED: Final = (
    "HassTurnOn", "HassTurnOff", "HassLightSet", "HassSetPosition", "HassFanSetSpeed",
    "HassClimateSetTemperature", "HassGetState", "HassStartTimer", "HassCancelTimer",
    "HassCancelAllTimers", "HassTimerStatus", "HassBroadcast", "HassGetCurrentTime",
    "HassGetCurrentDate", "HassNevermind",
)  # fmt: skip
LEADING_JUNK: Final = 2  # words before a command that may be skipped
NEGATIONS: Final = frozenset({"dont", "do", "not", "never", "no", "cant", "stop"})
MAX_TEXT: Final = 300  # characters of a transcript given to the matcher
DOMAIN_WORDS: Final = {
    "light": "lights", "switch": "switches", "fan": "fans", "cover": "covers",
    "climate": "thermostats", "scene": "scenes", "button": "buttons",
}  # fmt: skip


class IntentsUnavailable(Exception):
    """hassil or home-assistant-intents is missing, or has no such language."""


@dataclass(frozen=True)
class TimerRequest:
    op: Literal["start", "cancel", "cancel_all", "status"]
    seconds: float = 0.0
    name: str | None = None


@dataclass
class Intent:
    name: str  # turn_on, turn_off, set, color, position, temperature, state, scene, time, ...
    speech: str  # what the satellite says back
    actions: list[Action] = field(default_factory=list)
    slots: dict[str, str] = field(default_factory=dict)
    timer: TimerRequest | None = None
    broadcast: str | None = None


def normalise(text: str) -> str:
    text = text.lower().replace("%", " percent ").replace("'", "")
    text = re.sub(r"[^\w ]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _clean(text: str) -> str:
    """Whisper's transcript, as hassil wants it: no trailing period, bounded."""
    return text.strip()[:MAX_TEXT].rstrip(".!?。 ")


class IntentRecognizer:
    def __init__(
        self,
        cfg: IntentConfig,
        registry: Registry | None = None,
        *,
        area: str | None = None,
        language: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            import home_assistant_intents as hai
            from hassil import Intents
        except ImportError as exc:
            raise IntentsUnavailable(f"hassil / home-assistant-intents missing: {exc}") from exc
        self.cfg = cfg
        self.language = language or cfg.language
        self.registry = (
            registry
            if registry is not None
            else Registry(
                [from_config(i, d) for i, d in enumerate(cfg.devices)]
                + [from_scene(i, s) for i, s in enumerate(cfg.scenes)]
            )
        )
        self.area = area
        self.clock = clock
        data = hai.get_intents(self.language)
        if data is None:
            raise IntentsUnavailable(f"home-assistant-intents has no language {self.language!r}")
        wanted = set(SUPPORTED)
        if not cfg.timers:
            wanted -= {"HassStartTimer", "HassCancelTimer", "HassCancelAllTimers",
                       "HassTimerStatus"}  # fmt: skip
        if not cfg.time:
            wanted -= {"HassGetCurrentTime", "HassGetCurrentDate"}
        data = {**data, "intents": {k: v for k, v in data["intents"].items() if k in wanted}}
        self._intents: Any = Intents.from_dict(data)
        self._lists: dict[str, Any] = {}
        self._by_name: dict[tuple[str, str], list[Entity]] = {}
        self._entities: list[Entity] = []
        self._version = -1

    # ------------------------------------------------------------ slot lists

    def prepare(self) -> None:
        """Rebuild the slot lists if the registry changed.  Called on the thread that
        changes the registry (the event loop), so :meth:`recognize` can run on
        another one against a consistent snapshot."""
        self._slot_lists()

    def _slot_lists(self) -> dict[str, Any]:
        if self._version == self.registry.version and self._lists:
            return self._lists
        from hassil.intents import TextSlotList, TextSlotValue

        self._entities = list(self.registry)
        # The name slot's value is the spoken name: several entities may share it
        # ("light" in the kitchen and in the bedroom), resolved in _targets.
        self._by_name = {}
        areas: set[str] = set()
        for entity in self._entities:
            spoken = [entity.name]
            if entity.area:
                areas.add(entity.area)
                if not entity.name.lower().startswith(entity.area.lower()):
                    # "the kitchen light" names the light called "light" in the kitchen
                    spoken.append(f"{entity.area} {entity.name}")
            for text in spoken:
                found = self._by_name.setdefault((text.lower(), entity.component), [])
                found.append(entity)
        names = [
            TextSlotValue.from_tuple((text, text, {"domain": comp}), False)
            for text, comp in self._by_name
        ]
        if self.area:
            areas.add(self.area)
        self._lists = {
            "name": TextSlotList(name="name", values=names),
            "area": TextSlotList.from_strings(sorted(areas), name="area"),
            "floor": TextSlotList.from_strings([], name="floor"),
        }
        self._version = self.registry.version
        return self._lists

    # ------------------------------------------------------------ recognition

    def recognize(self, transcript: str) -> Intent | None:
        """The local intent of a transcript, or None (the realm is asked)."""
        words = _clean(transcript).split()
        # A filler or a stray token before the command ("uh", "okay", a "2." whisper
        # made of the wake word's tail) does not hide it: up to LEADING_JUNK words
        # are skipped (not a negation: "don't turn on the fan" is no command).
        for skip in range(min(LEADING_JUNK, max(len(words) - 1, 0)) + 1):
            if NEGATIONS.intersection(normalise(" ".join(words[:skip])).split()):
                break
            intent = self._recognize(" ".join(words[skip:]))
            if intent is not None:
                return intent
        return None

    def warm_up(self) -> None:
        """The first match builds hassil's caches (~0.1 s): do it before the first command."""
        self.recognize("turn on the light")

    def _recognize(self, text: str) -> Intent | None:
        from hassil import recognize_best

        if not text:
            return None
        context = {"area": self.area} if self.area else None
        result = recognize_best(
            text,
            self._intents,
            slot_lists=self._slot_lists(),
            intent_context=context,
            language=self.language,
            best_slot_name="name",
        )
        if result is None:
            return None
        slots = {k: v.value for k, v in result.entities.items()}
        try:
            return self._intent(result.intent.name, slots)
        except (TypeError, ValueError) as exc:  # a slot of an unexpected shape
            log.info("intent %s not carried out: %s", result.intent.name, exc)
            return None

    def _targets(self, slots: dict[str, Any]) -> list[Entity]:
        """The entities a sentence names: by name, or by area and domain."""
        spoken = slots.get("name")
        area = slots.get("area")
        if isinstance(spoken, str):
            found = [e for (t, _), es in self._by_name.items() if t == spoken.lower() for e in es]
            if len(found) > 1 and (area or self.area):  # the one in the named (or this) area
                where = str(area or self.area).lower()
                found = [e for e in found if (e.area or "").lower() == where] or found
            # One name for things in two areas, none said: no guess (the realm is asked).
            return found if len(found) == 1 else []
        area = area or self.area
        domain = slots.get("domain")
        if domain is None or area is None:
            return []
        domains = {domain} if isinstance(domain, str) else set(domain)
        return [
            e
            for e in self._entities
            if e.component in domains and (e.area or "").lower() == str(area).lower()
        ]

    def _intent(self, name: str, slots: dict[str, Any]) -> Intent | None:
        strs = {k: str(v) for k, v in slots.items()}
        if name == "HassGetCurrentTime":
            now = time.localtime(self.clock())
            hour = now.tm_hour % 12 or 12
            half = "AM" if now.tm_hour < 12 else "PM"
            return Intent("time", f"It is {hour}:{now.tm_min:02d} {half}.")
        if name == "HassGetCurrentDate":
            day = time.strftime("%A, %B %d", time.localtime(self.clock())).replace(" 0", " ")
            return Intent("date", f"Today is {day}.")
        if name == "HassNevermind":
            return Intent("nevermind", "")
        if name == "HassBroadcast":
            message = str(slots.get("message", "")).strip()
            return Intent("broadcast", "Done.", slots=strs, broadcast=message) if message else None
        if name in ("HassStartTimer", "HassCancelTimer", "HassCancelAllTimers", "HassTimerStatus"):
            return self._timer(name, slots, strs)
        targets = self._targets(slots)
        if not targets:
            return None  # matched, but nothing here by that name: the realm may know
        if name == "HassGetState":
            return self._state(targets, slots, strs)
        op, value, what = _operation(name, slots)
        if op is None:
            return None
        if all(t.key in self.registry.unavailable for t in targets):
            label = targets[0].label
            return Intent("unavailable", f"The {label} is unavailable.", slots=strs)
        actions = [a for e in targets for a in commands(e, op, value)]
        if not actions:
            return None
        label = targets[0].label if len(targets) == 1 else _group(targets, slots)
        intent, speech = _speech(op, value, label, targets)
        return Intent(intent, speech, actions, {**strs, "target": label, "what": what})

    def _timer(self, name: str, slots: dict[str, Any], strs: dict[str, str]) -> Intent:
        timer_name = slots.get("name") if isinstance(slots.get("name"), str) else None
        timer_name = str(slots.get("timer_name") or timer_name or "") or None
        if name == "HassStartTimer":
            seconds = _duration(slots)
            return Intent("timer_start", "", slots=strs,
                          timer=TimerRequest("start", seconds, timer_name))  # fmt: skip
        if name == "HassCancelAllTimers":
            return Intent("timer_cancel", "", slots=strs, timer=TimerRequest("cancel_all"))
        op: Literal["cancel", "status"] = "cancel" if name == "HassCancelTimer" else "status"
        return Intent(
            f"timer_{op}", "", slots=strs, timer=TimerRequest(op, _duration(slots), timer_name)
        )

    def _state(self, targets: list[Entity], slots: dict[str, Any], strs: dict[str, str]) -> Intent:
        entity = targets[0]
        state = self.registry.states.get(entity.key)
        if state is None:
            return Intent("state", f"I don't know the state of the {entity.label}.", slots=strs)
        asked = slots.get("state")
        if isinstance(asked, str):
            yes = state.lower() == asked.lower()
            return Intent("state", f"{'Yes' if yes else 'No'}, the {entity.label} is {state}.",
                          slots=strs)  # fmt: skip
        return Intent("state", f"The {entity.label} is {state}.", slots=strs)


def _duration(slots: dict[str, Any]) -> float:
    total = 0.0
    for unit, factor in (("hours", 3600), ("minutes", 60), ("seconds", 1)):
        value = slots.get(unit)
        if value in ("half", "1/2"):
            total += factor / 2
        elif value is not None:
            total += float(value) * factor
    return total


def _operation(name: str, slots: dict[str, Any]) -> tuple[Op | None, float | str | None, str]:
    if name == "HassTurnOn":
        return "on", None, ""
    if name == "HassTurnOff":
        return "off", None, ""
    if name == "HassLightSet":
        if "brightness" in slots:
            return "brightness", float(slots["brightness"]), "brightness"
        if "color" in slots:
            return "color", str(slots["color"]), "color"
        return None, None, ""
    if name == "HassSetPosition" and "position" in slots:
        return "position", float(slots["position"]), "position"
    if name == "HassFanSetSpeed" and "percentage" in slots:
        return "percentage", float(slots["percentage"]), "speed"
    if name == "HassClimateSetTemperature" and "temperature" in slots:
        return "temperature", float(slots["temperature"]), "temperature"
    return None, None, ""


def _group(targets: list[Entity], slots: dict[str, Any]) -> str:
    area = str(slots.get("area") or targets[0].area or "")
    word = DOMAIN_WORDS.get(targets[0].component, "devices")
    return f"{area} {word}".strip()


def _speech(
    op: Op, value: float | str | None, label: str, targets: list[Entity]
) -> tuple[str, str]:
    comp = targets[0].component
    if comp == "scene":
        return "scene", f"Activated {label}."
    if comp == "button":
        return "press", f"Pressed the {label}."
    if comp == "cover" and op in ("on", "off"):
        return (
            "open" if op == "on" else "close"
        ), f"{'Opened' if op == 'on' else 'Closed'} the {label}."
    if op in ("on", "off"):
        return f"turn_{op}", f"Turned {op} the {label}."
    if op == "color":
        return "color", f"Set the {label} to {value}."
    number = f"{float(value or 0):g}"
    if op == "temperature":
        return "temperature", f"Set the {label} to {number} degrees."
    return "set", f"Set the {label} to {number} percent."
