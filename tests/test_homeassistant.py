"""Home Assistant discovery on a real broker: what a Home Assistant would see and send.

Home Assistant itself cannot run here; the test client plays its part with
the real protocol: it reads the retained discovery configs, validates every
payload against the keys Home Assistant accepts (``tests/ha_discovery_schema``),
renders the templates the way Home Assistant does (Jinja2 with ``value_json``)
against the real state messages, and publishes what Home Assistant publishes
(its birth, rendered command templates, a button's ``payload_press``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.entities import EntitySpec
from daemon.homeassistant import bridge as bridge_module
from daemon.homeassistant.bridge import Bridge
from daemon.homeassistant.discovery import Device
from daemon.messages import decode
from daemon.orchestrator.service import Orchestrator
from daemon.protocol.node import Event, NodeInfo
from daemon.runtime import NodeDaemon
from tests import ha_discovery_schema as schema
from tests.conftest import Collector, MtorProcess, make_config, running_bus, write_config
from tests.ha_discovery_schema import render


@pytest.fixture
def prefix() -> str:
    """A discovery prefix of the test's own (the session broker is shared)."""
    return "ha" + uuid.uuid4().hex[:8]


def sensors_node(*custom: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "sensors",
        "interval": 0.2,
        "min_interval": 0,
        "heartbeat": 0.4,
        "builtin": ["memory"],
        "sensors": list(custom),
    }


ANSWER = {"name": "answer", "command": "echo 42", "unit": "W", "device_class": "power"}
EXTRA = {"name": "extra", "command": "echo 7", "state_class": "total_increasing"}


def ha_config(url: str, realm: str, prefix: str, *sensors: dict[str, Any], **extra: Any) -> Config:
    ha = {"discovery_prefix": prefix, "birth_topic": f"{prefix}/status", **extra.pop("ha", {})}
    return make_config(
        url,
        realm,
        node_id="pi",
        area="kitchen",
        homeassistant=ha,
        daemon={"health_interval": 0.3},
        nodes={"sensors": sensors_node(*sensors)},
        **extra,
    )


@contextlib.asynccontextmanager
async def running_daemon(cfg: Config) -> AsyncIterator[NodeDaemon]:
    daemon = NodeDaemon(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon._online.wait(), 10)
        yield daemon
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


class Discovery(Collector):
    """Discovery configs by topic (the latest payload of each)."""

    def latest(self) -> dict[str, bytes]:
        return {m.topic: m.payload for m in self.messages}

    async def wait_topics(self, wanted: set[str], timeout: float = 10.0) -> dict[str, Any]:
        await self.wait_for(
            lambda _m: wanted <= {t for t, p in self.latest().items() if p}, timeout
        )
        return {t: json.loads(p) for t, p in self.latest().items() if p}


def topic_of(prefix: str, component: str, realm: str, object_id: str, node: str = "pi") -> str:
    return f"{prefix}/{component}/mtor_{realm}_{node}/{object_id}/config"


def check_all(found: dict[str, Any], prefix: str) -> None:
    for topic, payload in found.items():
        parsed = topics.ha_discovery_parse(prefix, topic)
        assert parsed is not None, topic
        component, node_id, object_id = parsed
        assert schema.valid_ids(node_id, object_id), topic
        assert schema.problems(component, payload) == [], (topic, payload)


async def test_node_device_payloads_and_templates(
    broker: PrivateBroker, realm: str, prefix: str
) -> None:
    cfg = ha_config(broker.url, realm, prefix, ANSWER)
    async with running_bus(cfg) as bus:
        disc, events, healths = Discovery(), Collector(), Collector()
        await bus.subscribe(f"{prefix}/#", disc)
        await bus.subscribe(f"mtor/{realm}/event/pi/sensor/+", events)
        await bus.subscribe(f"mtor/{realm}/node/pi/health", healths)
        async with running_daemon(cfg):
            wanted = {
                topic_of(prefix, "sensor", realm, "sensors_answer"),
                topic_of(prefix, "sensor", realm, "sensors_memory"),
                topic_of(prefix, "binary_sensor", realm, "online"),
                topic_of(prefix, "button", realm, "restart"),
                topic_of(prefix, "sensor", realm, "health_cpu"),
            }
            found = await disc.wait_topics(wanted)
            answer = found[topic_of(prefix, "sensor", realm, "sensors_answer")]
            event = await events.wait_for(lambda m: m.topic == answer["state_topic"])
            health = await asyncio.wait_for(_retained(bus, answer["availability"][0]["topic"]), 5)
            first_health = await healths.wait_for(lambda _m: True)
            later_health = await healths.wait_for(lambda m: b"cpu_percent" in m.payload)
    check_all(found, prefix)
    # The device block and availability every entity shares.
    device = answer["device"]
    assert device["identifiers"] == [f"mtor_{realm}_pi"]
    assert device["suggested_area"] == "kitchen"
    assert device["name"] == "pi" and device["manufacturer"] == "M-TOR"
    assert {d["device"]["identifiers"][0] for d in found.values()} == {f"mtor_{realm}_pi"}
    assert len({d["unique_id"] for d in found.values()}) == len(found)
    assert answer["unit_of_measurement"] == "W" and answer["device_class"] == "power"
    assert answer["state_class"] == "measurement"
    # Home Assistant's templates give the real values.
    assert render(answer["value_template"], event.payload) == "42.0"
    avail = answer["availability"][0]
    assert render(avail["value_template"], health) == avail["payload_available"]
    online = found[topic_of(prefix, "binary_sensor", realm, "online")]
    assert "availability" not in online  # it must read "off" when the daemon is gone
    assert render(online["value_template"], health) == online["payload_on"]
    cpu = found[topic_of(prefix, "sensor", realm, "health_cpu")]
    assert cpu["entity_category"] == "diagnostic"
    assert cpu["state_topic"] == f"mtor/{realm}/node/pi/health"
    # The first health has no CPU % yet (it needs two samples): "None" is "unknown".
    assert render(cpu["value_template"], first_health.payload) == "None"
    assert 0.0 <= float(render(cpu["value_template"], later_health.payload)) <= 100.0


async def _retained(bus: Bus, topic: str) -> bytes:
    got = Collector()
    await bus.subscribe(topic, got)
    try:
        return (await got.wait_for(lambda _m: True, timeout=5)).payload
    finally:
        await bus.unsubscribe(topic)


async def test_availability_goes_offline_after_kill9(
    broker: PrivateBroker, realm: str, prefix: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    path = write_config(
        tmp_path,
        {
            "realm": realm,
            "node_id": "pi",
            "broker": {"url": broker.url},
            "homeassistant": {"discovery_prefix": prefix},
            "daemon": {"health_interval": 60},
            "nodes": {"sensors": sensors_node()},
        },
    )
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        disc, avail = Discovery(), Collector()
        await bus.subscribe(f"{prefix}/#", disc)
        proc = MtorProcess(["node", "--config", str(path)])
        processes.append(proc)
        memory = topic_of(prefix, "sensor", realm, "sensors_memory")
        found = await disc.wait_topics({memory}, timeout=15)
        item = found[memory]["availability"][0]
        await bus.subscribe(item["topic"], avail)

        def renders(payload: str) -> Any:
            return lambda m: render(item["value_template"], m.payload) == payload

        await avail.wait_for(renders(item["payload_available"]))
        proc.kill9()
        await avail.wait_for(renders(item["payload_not_available"]))


async def test_reannounce_on_birth(broker: PrivateBroker, realm: str, prefix: str) -> None:
    cfg = ha_config(broker.url, realm, prefix, ANSWER)
    async with running_daemon(cfg) as daemon, running_bus(cfg) as bus:
        disc = Discovery()
        await bus.subscribe(f"{prefix}/#", disc)
        answer = topic_of(prefix, "sensor", realm, "sensors_answer")
        await disc.wait_topics({answer})
        retained = {m.topic for m in disc.messages if m.retain}
        before = daemon.homeassistant.announcements
        await bus.publish(f"{prefix}/status", b"offline")  # HA going away: nothing to do
        await bus.publish(f"{prefix}/status", b"online")
        # Live (not retained) copies of every config arrive after the birth.
        await disc.wait_for(
            lambda _m: retained <= {m.topic for m in disc.messages if not m.retain and m.payload}
        )
        assert daemon.homeassistant.announcements == before + 1


async def test_birth_republishes_sensor_readings(
    broker: PrivateBroker, realm: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readings are not retained: after HA's birth the last ones are sent again at once
    (the heartbeat is an hour here, so nothing else would send them)."""
    monkeypatch.setattr(bridge_module, "STATES_AFTER_DISCOVERY", (3600.0,))  # not those
    cfg = ha_config(broker.url, realm, prefix, ANSWER)
    quiet = {**sensors_node(ANSWER), "heartbeat": 3600, "builtin": []}
    cfg = cfg.model_copy(update={"nodes": make_config(broker.url, realm, nodes={"s": quiet}).nodes})
    state = topics.EVENT.build(realm=realm, node_id="pi", domain="sensor", name="answer")
    async with running_bus(cfg) as bus:
        readings = Collector()
        await bus.subscribe(state, readings)
        async with running_daemon(cfg):
            await readings.wait_count(1, timeout=10)  # the first reading
            await asyncio.sleep(0.5)
            assert len(readings.messages) == 1  # deadband + heartbeat: no repeats by themselves
            await bus.publish(f"{prefix}/status", b"online")
            again = await readings.wait_count(2, timeout=10)
    assert decode(again[1].payload, Event).value == decode(again[0].payload, Event).value == 42


async def test_a_home_assistant_already_running_gets_the_first_states(
    broker: PrivateBroker, realm: str, prefix: str
) -> None:
    """Home Assistant subscribes to a state topic only once it has processed the
    config (here: 0.5 s after it arrives), so it missed the first readings and showed
    `unknown` until the heartbeat (an hour here). The daemon sends them again after
    announcing; and its own load / memory diagnostics give way to the sensors node's."""
    quiet = {**sensors_node(ANSWER), "heartbeat": 3600, "builtin": ["load", "memory"]}
    cfg = ha_config(broker.url, realm, prefix, ANSWER)
    cfg = cfg.model_copy(update={"nodes": make_config(broker.url, realm, nodes={"s": quiet}).nodes})
    states: dict[str, list[bytes]] = {}
    configs = Discovery()
    async with running_bus(cfg) as ha:

        async def on_config(msg: Inbound) -> None:
            await configs(msg)
            if not msg.payload:
                return
            topic = json.loads(msg.payload).get("state_topic")
            if topic is None or topic in states:
                return
            states[topic] = []

            async def subscribe_later() -> None:
                await asyncio.sleep(0.5)  # HA processing the config

                async def on_state(m: Inbound, topic: str = topic) -> None:
                    states[topic].append(m.payload)

                await ha.subscribe(topic, on_state)

            asyncio.get_running_loop().create_task(subscribe_later())

        await ha.subscribe(f"{prefix}/+/mtor_{realm}_pi/+/config", on_config)
        async with running_daemon(cfg):
            answer = topics.EVENT.build(realm=realm, node_id="pi", domain="sensor", name="answer")
            async with asyncio.timeout(8):
                while not states.get(answer):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the entity set has settled: duplicates are cleared
    assert decode(states[answer][0], Event).value == 42
    found = {t.split("/")[-2] for t, p in configs.latest().items() if p}
    assert {"s_load", "s_memory", "s_answer"} <= found
    assert not {"health_load", "health_memory"} & found, found


async def test_removed_sensor_is_cleared_on_restart(
    broker: PrivateBroker, realm: str, prefix: str
) -> None:
    first = ha_config(broker.url, realm, prefix, ANSWER, EXTRA)
    extra = topic_of(prefix, "sensor", realm, "sensors_extra")
    answer = topic_of(prefix, "sensor", realm, "sensors_answer")
    cpu = topic_of(prefix, "sensor", realm, "health_cpu")
    async with running_bus(first) as bus:
        disc = Discovery()
        await bus.subscribe(f"{prefix}/#", disc)
        async with running_daemon(first):
            found = await disc.wait_topics({extra, answer, cpu})
            assert found[extra]["state_class"] == "total_increasing"
        # Restart with the extra sensor and the health entities removed from config.
        second = ha_config(broker.url, realm, prefix, ANSWER, ha={"health_entities": False})
        async with running_daemon(second):
            await disc.wait_for(lambda m: m.topic == extra and m.payload == b"")
            await disc.wait_for(lambda m: m.topic == cpu and m.payload == b"")
    async with running_bus(first) as late:  # a Home Assistant starting now
        seen = Discovery()
        await late.subscribe(f"{prefix}/#", seen)
        online = topic_of(prefix, "binary_sensor", realm, "online")
        remaining = await seen.wait_topics({answer, online})
        assert extra not in remaining and cpu not in remaining


async def test_restart_button_restarts_the_nodes(
    broker: PrivateBroker, realm: str, prefix: str
) -> None:
    cfg = ha_config(broker.url, realm, prefix)
    async with running_daemon(cfg), running_bus(cfg) as bus:
        disc, infos = Discovery(), Collector()
        await bus.subscribe(f"{prefix}/#", disc)
        await bus.subscribe(f"mtor/{realm}/node/pi/info", infos)
        button = topic_of(prefix, "button", realm, "restart")
        cfg_button = (await disc.wait_topics({button}))[button]
        # What Home Assistant publishes when the button is pressed:
        await bus.publish(cfg_button["command_topic"], cfg_button["payload_press"].encode())

        def restarted(m: Inbound) -> bool:
            info = decode(m.payload, NodeInfo)
            return any(n.name == "sensors" and n.restarts == 1 for n in info.nodes)

        await infos.wait_for(restarted)


async def test_switch_command_round_trip(broker: PrivateBroker, realm: str, prefix: str) -> None:
    cfg = ha_config(broker.url, realm, prefix)
    state_topic = f"mtor/{realm}/event/pi/camera/detect"
    calls: list[Any] = []
    node_bus = Bus(cfg.broker, f"node-{uuid.uuid4().hex[:6]}")

    async def switch(value: Any) -> None:
        calls.append(value)
        await node_bus.publish(state_topic, Event(value=value), retain=True)

    spec = EntitySpec("switch", "detect", "Detection", state_topic, on_command=switch)
    device = Device("mtor_x_pi", "mtor_x_pi", "pi", "test", availability_topic=None)
    broken = EntitySpec("switch", "broken", "No command", state_topic)  # HA would refuse it
    bridge = Bridge(
        node_bus,
        cfg.homeassistant,
        device,
        realm=realm,
        node_id="pi",
        entities=lambda: [broken, spec],
    )
    bus_task = asyncio.create_task(node_bus.run())
    try:
        await bridge.start()
        await node_bus.wait_connected(5)
        await bridge.refresh()
        async with running_bus(cfg) as ha:
            disc, states = Discovery(), Collector()
            await ha.subscribe(f"{prefix}/#", disc)
            await ha.subscribe(state_topic, states)
            topic = f"{prefix}/switch/mtor_x_pi/detect/config"
            sw = (await disc.wait_topics({topic}))[topic]
            assert schema.problems("switch", sw) == []
            assert not any("broken" in m.topic for m in disc.messages)  # published in order
            bad = render(sw["command_template"], "", value="maybe")
            await ha.publish(sw["command_topic"], bad)  # refused, logged
            await ha.publish(sw["command_topic"], b"not json")  # refused, logged
            for action, expected in ((sw["payload_on"], "state_on"), ("OFF", "state_off")):
                await ha.publish(
                    sw["command_topic"], render(sw["command_template"], "", value=action)
                )
                await states.wait_for(
                    lambda m, want=sw[expected]: render(sw["value_template"], m.payload) == want
                )
        assert calls == [True, False]
    finally:
        bus_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bus_task


async def test_armed_panel_round_trip(
    broker: PrivateBroker, realm: str, prefix: str, tmp_path: Path
) -> None:
    cfg = make_config(
        broker.url,
        realm,
        homeassistant={"discovery_prefix": prefix, "birth_topic": f"{prefix}/status"},
        orchestrator={"state_dir": str(tmp_path)},
    )
    orch = Orchestrator(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(orch.run(stop))
    try:
        await asyncio.wait_for(orch._online.wait(), 10)
        async with running_bus(cfg) as ha:
            disc, states, avail = Discovery(), Collector(), Collector()
            await ha.subscribe(f"{prefix}/#", disc)
            topic = topic_of(prefix, "alarm_control_panel", realm, "armed", node="realm")
            panel = (await disc.wait_topics({topic}))[topic]
            assert schema.problems("alarm_control_panel", panel) == []
            item = panel["availability"][0]
            await ha.subscribe(item["topic"], avail)
            await avail.wait_for(
                lambda m: render(item["value_template"], m.payload) == item["payload_available"]
            )
            await ha.subscribe(panel["state_topic"], states)
            for action in ("payload_arm_home", "payload_disarm", "payload_arm_night"):
                command = render(panel["command_template"], "", action=panel[action], code=None)
                await ha.publish(panel["command_topic"], command)
                await states.wait_for(
                    lambda m, want=panel[action]: render(panel["value_template"], m.payload) == want
                )
            assert orch.state.get("armed") == "armed_night"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
