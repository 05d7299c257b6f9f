"""Home Assistant for cameras: switches (detect, motion, snapshots, recordings) driven
through discovery's command topics, presence binary sensors per label, and the alarm
panel going `triggered` on an alarm and back (a real broker, real discovery configs)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.homeassistant import panel as panel_mod
from daemon.homeassistant.panel import AlarmPanel, panel_state, panel_topic
from daemon.messages import decode
from daemon.protocol.node import Event
from daemon.protocol.state import RealmState
from tests import ha_discovery_schema as schema
from tests.conftest import Collector, make_config, running_bus
from tests.ha_discovery_schema import render
from tests.test_camera import camera_daemon, camera_node, node_of, write_video


def test_panel_state_rule() -> None:
    assert panel_state(None, None, 0.0) == "disarmed"
    assert panel_state("armed_away", None, 0.0) == "armed_away"
    assert panel_state("armed_away", 10.0, 11.0) == "triggered"
    assert panel_state("armed_away", 10.0, 10.0 + panel_mod.TRIGGERED_SECONDS) == "armed_away"
    assert panel_state("disarmed", 10.0, 11.0) == "disarmed"  # disarming ends it at once


async def test_alarm_panel_goes_triggered_and_returns(
    broker: PrivateBroker, realm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(panel_mod, "TRIGGERED_SECONDS", 0.6)
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        states = Collector()
        await bus.subscribe(panel_topic(realm), states)

        def values() -> list[Any]:
            return [decode(m.payload, Event).value for m in states.messages if m.payload]

        async def shown(*want: str) -> None:
            await states.wait_for(lambda _m: values() == list(want), 5)

        armed = topics.STATE.build(realm=realm, key="armed")
        await bus.publish(armed, RealmState(value="armed_away"), retain=True)
        panel = AlarmPanel(bus, realm)
        await panel.start()
        await shown("armed_away")
        alarm = topics.EVENT.build(realm=realm, node_id="cam1", domain="vision", name="alarm")
        await bus.publish(alarm, b"{broken")  # logged, ignored
        await bus.publish(alarm, Event(value="person", attrs={"camera": "door"}))
        await shown("armed_away", "triggered")
        await shown("armed_away", "triggered", "armed_away")  # back after TRIGGERED_SECONDS
        await bus.publish(alarm, Event(value="person", attrs={"camera": "door"}))
        await shown("armed_away", "triggered", "armed_away", "triggered")
        await bus.publish(armed, RealmState(value="disarmed"), retain=True)
        await shown("armed_away", "triggered", "armed_away", "triggered", "disarmed")
        await bus.publish(alarm, Event(value="person"))  # disarmed: nothing to show
        await asyncio.sleep(0.8)
        assert values()[-1] == "disarmed" and len(values()) == 5
        assert panel.alarms == 2
        panel.close()


async def test_camera_switches_and_presence_through_discovery(
    broker: PrivateBroker, realm: str, tmp_path: Path
) -> None:
    prefix = f"ha{uuid.uuid4().hex[:6]}"
    video = write_video(tmp_path / "still.avi", [None] * 20)
    node = camera_node(video, tmp_path, loop=True, clips={"dir": str(tmp_path / "clips")}, fps=5)
    ha = {"discovery_prefix": prefix, "birth_topic": f"{prefix}/status"}
    config = make_config(broker.url, realm, node_id="cam1", nodes={"c": node}, homeassistant=ha)
    async with running_bus(config) as bus:
        disc, states = Collector(), Collector()
        await bus.subscribe(f"{prefix}/#", disc)
        await bus.subscribe(topics.EVENT.filter(realm=realm, node_id="cam1", domain="door"), states)
        async with camera_daemon(config) as daemon:

            def config_of(component: str, object_id: str) -> dict[str, Any]:
                topic = f"{prefix}/{component}/mtor_{realm}_cam1/{object_id}/config"
                return json.loads(next(m.payload for m in disc.messages if m.topic == topic))

            wanted = [
                ("switch", f"door_{s}_enabled")
                for s in ("detect", "motion", "snapshots", "recordings")
            ] + [("binary_sensor", "door_person_present"), ("sensor", "door_clips_bytes")]
            await disc.wait_for(
                lambda _m: all(
                    any(
                        m.topic.endswith(f"/{c}/mtor_{realm}_cam1/{o}/config")
                        for m in disc.messages
                    )
                    for c, o in wanted
                ),
                15,
            )
            for component, object_id in wanted:
                assert schema.problems(component, config_of(component, object_id)) == []
            present = config_of("binary_sensor", "door_person_present")
            assert present["device_class"] == "occupancy"
            first: Inbound = await states.wait_for(lambda m: m.topic == present["state_topic"], 10)
            assert render(present["value_template"], first.payload) == present["payload_off"]

            cam = node_of(daemon).cameras["door"]
            for switch in ("detect", "recordings", "motion"):
                sw = config_of("switch", f"door_{switch}_enabled")
                await states.wait_for(
                    lambda m, sw=sw: (
                        m.topic == sw["state_topic"]
                        and render(sw["value_template"], m.payload) == sw["state_on"]
                    ),
                    10,
                )
                off = render(sw["command_template"], "", value="OFF")
                await bus.publish(sw["command_topic"], off.encode())
                await states.wait_for(
                    lambda m, sw=sw: (
                        m.topic == sw["state_topic"]
                        and render(sw["value_template"], m.payload) == sw["state_off"]
                    ),
                    10,
                )
                assert cam.switches[switch] is False
            assert cam.archive.recorder is not None and not cam.archive.recorder.enabled
            assert not cam.archive.recorder.start("1.0-ab", 1.0)  # recordings off: no clip
            sw = config_of("switch", "door_detect_enabled")
            on = render(sw["command_template"], "", value="ON")
            await bus.publish(sw["command_topic"], on.encode())
            async with asyncio.timeout(10):
                while not cam.switches["detect"]:
                    await asyncio.sleep(0.05)
