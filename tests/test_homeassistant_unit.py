"""Home Assistant discovery payloads, templates and command validation (no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.entities import EntityCommand, EntitySpec
from daemon.homeassistant.bridge import CommandError, command_value
from daemon.homeassistant.discovery import (
    ENTITY_COMMAND_TEMPLATE,
    Device,
    entity_config,
    safe_id,
    value_template,
)
from daemon.homeassistant.realm import armed_panel
from daemon.messages import decode, encode
from daemon.protocol.node import Event, NodeHealth, NodeState
from daemon.protocol.state import RealmState, StateSet
from tests import ha_discovery_schema as schema
from tests.conftest import make_config
from tests.ha_discovery_schema import render

DEVICE = Device(
    ha_node_id="mtor_home_pi",
    identifier="mtor_home_pi",
    name="pi",
    model="M-TOR node (x86_64)",
    area="kitchen",
    availability_topic="mtor/home/node/pi/state",
)
STATE = "mtor/home/event/pi/sensor/x"


async def _noop(_value: Any) -> None:
    return None


SPECS = [
    EntitySpec("sensor", "temp", "Temp", STATE, device_class="temperature", unit="°C",
               state_class="measurement"),
    EntitySpec("binary_sensor", "motion", "Motion", STATE, device_class="motion"),
    EntitySpec("switch", "detect", "Detect", STATE, on_command=_noop),
    EntitySpec("button", "snap", "Snapshot", on_command=_noop),
    EntitySpec("select", "mode", "Mode", STATE, options=("a", "b"), on_command=_noop),
    EntitySpec("number", "gain", "Gain", STATE, unit="dB", on_command=_noop,
               extra={"min": 0, "max": 10, "step": 0.5, "mode": "slider"}),
    EntitySpec("text", "say", "Say", STATE, on_command=_noop),
    EntitySpec("camera", "snapshot", "Snapshot", "mtor/home/media/pi/cam/snapshot"),
    EntitySpec("image", "last", "Last", "mtor/home/media/pi/cam/last", content_type="image/jpeg"),
    EntitySpec("sensor", "transcript", "Transcript", STATE, icon="mdi:text", diagnostic=True),
]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.component}-{s.object_id}")
def test_every_component_payload_is_valid(spec: EntitySpec) -> None:
    object_id, cfg = entity_config(spec, DEVICE, realm="home", node_id="pi")
    assert schema.problems(spec.component, cfg) == []
    assert schema.valid_ids(DEVICE.ha_node_id, object_id)
    assert cfg["device"]["suggested_area"] == "kitchen"
    assert cfg["origin"]["name"] == "M-TOR"
    assert cfg["availability"][0]["topic"] == "mtor/home/node/pi/state"


def test_the_schema_catches_mistakes() -> None:
    _, cfg = entity_config(SPECS[0], DEVICE, realm="home", node_id="pi")
    assert schema.problems("sensor", {**cfg, "unit": "°C"}) == [
        "key 'unit' is not accepted by a sensor"
    ]
    no_state = {k: v for k, v in cfg.items() if k != "state_topic"}
    assert "missing required key 'state_topic'" in schema.problems("sensor", no_state)
    assert schema.problems("button", {**cfg, "command_topic": "a/+/b"})  # sensor keys, wildcard
    bad_device = {**cfg, "device": {"name": "x"}}
    assert "device needs identifiers or connections" in schema.problems("sensor", bad_device)
    abbreviated = {**cfg, "stat_t": cfg["state_topic"]}
    assert schema.problems("sensor", abbreviated)


def test_value_templates_extract_real_messages() -> None:
    event = encode(Event(value=21.5, unit="°C"))
    assert render(value_template("value") or "", event) == "21.5"
    assert render(value_template("value") or "", encode(Event(value=None))) == "None"
    health = encode(NodeHealth(boot_id="b", uptime_s=1, load=(0.25, 0.5, 1.0), mem_percent=40.1))
    assert render(value_template("load.0") or "", health) == "0.25"
    assert render(value_template("mem_percent") or "", health) == "40.1"
    bare = encode(NodeHealth(boot_id="b", uptime_s=1))  # no load on this host
    assert render(value_template("load.0") or "", bare) == "None"
    assert value_template(None) is None
    long_text = encode(Event(value="word " * 100))  # a 500-character transcript
    cut = render(value_template("value", max_length=255) or "", long_text)
    assert cut == ("word " * 100)[:255]
    assert render(value_template("value", 255) or "", encode(Event(value=None))) == "None"


def test_binary_sensor_payloads_match_the_rendered_value() -> None:
    spec = EntitySpec("binary_sensor", "m", "M", STATE)
    _, cfg = entity_config(spec, DEVICE, realm="home", node_id="pi")
    assert render(cfg["value_template"], encode(Event(value=True))) == cfg["payload_on"]
    assert render(cfg["value_template"], encode(Event(value=False))) == cfg["payload_off"]


def test_availability_renders_node_state() -> None:
    item = DEVICE.availability()[0]
    online = encode(NodeState(state="online", boot_id="b"))
    offline = encode(NodeState(state="offline", boot_id="b"))
    assert render(item["value_template"], online) == item["payload_available"]
    assert render(item["value_template"], offline) == item["payload_not_available"]


@pytest.mark.parametrize("value", ["ON", 21.5, 3, "option b", None])
def test_command_template_makes_an_entity_command(value: Any) -> None:
    out = render(ENTITY_COMMAND_TEMPLATE, "", value=value)
    assert decode(out, EntityCommand).value == value


def test_command_values_are_validated() -> None:
    switch = EntitySpec("switch", "s", "S", payload_on="yes", payload_off="no")
    assert command_value(switch, "ON") == "yes"
    assert command_value(switch, "OFF") == "no"
    number = EntitySpec("number", "n", "N", extra={"min": 0, "max": 10})
    assert command_value(number, "2.5") == 2.5
    select = EntitySpec("select", "o", "O", options=("a", "b"))
    assert command_value(select, "b") == "b"
    assert command_value(EntitySpec("button", "b", "B"), "PRESS") is None
    for spec, bad in [
        (switch, "maybe"),
        (number, 11),
        (number, "nan"),
        (number, True),
        (select, "c"),
        (EntitySpec("text", "t", "T"), "x" * 300),
        (EntitySpec("sensor", "r", "R"), 1),
    ]:
        with pytest.raises(CommandError):
            command_value(spec, bad)


def test_armed_panel_payload_and_command_template() -> None:
    config = make_config("mqtt://localhost:1", "home")
    spec = armed_panel(config)
    _, cfg = entity_config(spec, DEVICE, realm="home", node_id="realm")
    assert schema.problems("alarm_control_panel", cfg) == []
    assert cfg["state_topic"] == "mtor/home/event/realm/alarm/panel"  # armed, or triggered
    assert cfg["command_topic"] == "mtor/home/state/armed/set/homeassistant"
    assert set(cfg["supported_features"]) == {"arm_home", "arm_away", "arm_night"}
    # What Home Assistant publishes when someone presses "arm away":
    out = render(cfg["command_template"], "", action=cfg["payload_arm_away"], code=None)
    assert decode(out, StateSet).value == "armed_away"
    state = encode(RealmState(value="armed_home", by="x"))
    assert render(cfg["value_template"], state) == "armed_home"


def test_safe_ids() -> None:
    assert safe_id("pi.kitchen-1") == "pi_kitchen-1"
    assert schema.valid_ids(safe_id("a.b"), safe_id("c d"))


def test_incomplete_entities_are_detected() -> None:
    from daemon.homeassistant.discovery import missing

    _, cfg = entity_config(EntitySpec("switch", "s", "S", STATE), DEVICE, realm="h", node_id="p")
    assert missing("switch", cfg) == ["command_topic"]
    _, cfg = entity_config(
        EntitySpec("select", "o", "O", on_command=_noop), DEVICE, realm="h", node_id="p"
    )
    assert missing("select", cfg) == ["options"]
    for spec in SPECS:
        _, cfg = entity_config(spec, DEVICE, realm="h", node_id="p")
        assert missing(spec.component, cfg) == []
