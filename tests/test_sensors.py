"""The sensors node: parsing and publish policy (unit), a node daemon against the
real broker (component), and `mtor node` + `mtor events` as real processes (end to end)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from daemon import hostinfo
from daemon.broker import PrivateBroker
from daemon.bus import Inbound
from daemon.config import Config
from daemon.messages import decode
from daemon.protocol.node import Event
from daemon.runtime import NodeDaemon
from nodes.sensors.config import SensorsConfig, SensorSpec, disk_sensor_name
from nodes.sensors.node import Sensor, SensorsNode
from nodes.sensors.policy import PublishPolicy
from nodes.sensors.readers import SensorError, parse_value, scaled
from tests.conftest import (
    ROOT,
    Collector,
    MtorProcess,
    make_config,
    mtor_env,
    running_bus,
    write_config,
)

NODE_ID = "sens1"
W1_SLAVE = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"

# ------------------------------------------------------------------ unit


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("42\n", {}, 42.0),
        ("  -3.5 ", {}, -3.5),
        ('{"a":{"b":3.5}}', {"json_field": "a.b"}, 3.5),
        ('{"list":[1,{"t":"21.5"}]}', {"json_field": "list.1.t"}, 21.5),
        ('{"on": true}', {"json_field": "on"}, 1.0),
        ('{"s": "temp=19.25C"}', {"json_field": "s", "regex": r"temp=([\d.]+)"}, 19.25),
        (W1_SLAVE, {"regex": r"t=(-?\d+)"}, 23125.0),
        (W1_SLAVE, {"regex": r"(?s)YES.*t=(-?\d+)"}, 23125.0),
        ("value: 7", {"regex": r"\d+"}, 7.0),
    ],
)
def test_parse_value(text: str, kwargs: dict[str, str], expected: float) -> None:
    assert parse_value(text, **kwargs) == expected


@pytest.mark.parametrize(
    ("text", "kwargs", "error"),
    [
        ("hello", {}, "not a number"),
        ("", {}, "not a number"),
        ("nan", {}, "finite"),
        ("{oops", {"json_field": "a"}, "not JSON"),
        ('{"a": 1}', {"json_field": "b"}, "no 'b'"),
        ('{"a": [1]}', {"json_field": "a.5"}, "no '5'"),
        ('{"a": {"b": 1}}', {"json_field": "a"}, "not a number"),
        (W1_SLAVE.replace("YES", "NO"), {"regex": r"(?s)YES.*t=(-?\d+)"}, "does not match"),
    ],
)
def test_parse_value_errors(text: str, kwargs: dict[str, str], error: str) -> None:
    with pytest.raises(SensorError, match=error):
        parse_value(text, **kwargs)


def test_scale_offset_precision() -> None:
    spec = SensorSpec(name="w1", file="/x", scale=0.001)
    assert scaled(23125, spec) == 23.125
    assert scaled(3, SensorSpec(name="x", command="true", scale=0.1)) == 0.3  # no float noise
    spec = SensorSpec(name="x", command="true", scale=1.8, offset=32, precision=1)
    assert scaled(21.37, spec) == 70.5


def test_policy_deadband_min_interval_heartbeat() -> None:
    p = PublishPolicy(deadband=1.0, min_interval=5.0, heartbeat=60.0)
    assert p.should_publish(20.0, 0.0)  # first reading
    p.published(20.0, 0.0)
    assert not p.should_publish(25.0, 1.0)  # big change, but within min_interval
    assert not p.should_publish(20.5, 10.0)  # small change
    assert not p.should_publish(21.0, 10.0)  # exactly the deadband is not "more than"
    assert p.should_publish(21.5, 10.0)
    p.published(21.5, 10.0)
    assert not p.should_publish(21.5, 69.0)
    assert p.should_publish(21.5, 70.0)  # heartbeat: unchanged but due
    p.reset()
    assert p.should_publish(21.5, 70.5)  # after a failure, the next value is news


def test_config_names_and_defaults() -> None:
    assert disk_sensor_name("/") == "disk_root"
    assert disk_sensor_name("/mnt/Data disk/") == "disk_mnt_data_disk"
    cfg = SensorsConfig.model_validate({"deadbands": {"load": 0.2}, "disk_paths": ["/", "/var"]})
    assert cfg.deadbands["load"] == 0.2
    assert cfg.deadbands["memory"] == 1.0  # the others keep their defaults
    assert cfg.sensor_names() == [
        "cpu_temperature",
        "load",
        "memory",
        "disk_root",
        "disk_var",
        "uptime",
    ]
    with pytest.raises(ValidationError, match="two sensors would publish as 'memory'"):
        SensorsConfig.model_validate({"sensors": [{"name": "memory", "command": "echo 1"}]})
    with pytest.raises(ValidationError, match="exactly one of 'command' or 'file'"):
        SensorSpec(name="x", command="echo 1", file="/x")
    with pytest.raises(ValidationError, match="invalid regex"):
        SensorSpec(name="x", command="echo 1", regex="(")
    with pytest.raises(ValidationError, match="should match pattern"):
        SensorSpec(name="a/b", command="echo 1")


# ------------------------------------------------------------- component


def sensors_config(
    broker: PrivateBroker, realm: str, sensors: list[dict[str, Any]], **node: Any
) -> Config:
    entry: dict[str, Any] = {
        "type": "sensors",
        "interval": 0.2,
        "min_interval": 0,
        "heartbeat": 3600,
        "builtin": [],
        "sensors": sensors,
        **node,
    }
    return make_config(
        broker.url,
        realm,
        node_id=NODE_ID,
        nodes={"s": entry},
        daemon={"health_interval": 3600},
    )


@contextlib.asynccontextmanager
async def sensor_events(config: Config) -> AsyncIterator[tuple[Collector, NodeDaemon]]:
    """Subscribe to the node's sensor events, then run its daemon in-process."""
    async with running_bus(config) as bus:
        got = Collector()
        await bus.subscribe(f"mtor/{config.realm}/event/{NODE_ID}/sensor/+", got)
        daemon = NodeDaemon(config)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        try:
            yield got, daemon
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await task


def named(name: str, pred: Callable[[Event], bool] = lambda e: True) -> Callable[[Inbound], bool]:
    def match(m: Inbound) -> bool:
        return m.topic.endswith(f"/sensor/{name}") and pred(decode(m.payload, Event))

    return match


def values(got: Collector, name: str) -> list[Any]:
    return [decode(m.payload, Event).value for m in got.messages if named(name)(m)]


def sensor(daemon: NodeDaemon, name: str) -> Sensor:
    node = daemon.hosted["s"].node
    assert isinstance(node, SensorsNode)
    return next(s for s in node.sensors if s.reader.name == name)


async def reads_pass(daemon: NodeDaemon, name: str, n: int, timeout: float = 5.0) -> None:
    """Wait until the sensor has been read ``n`` more times."""
    async with asyncio.timeout(timeout):
        while not (daemon.hosted.get("s") and daemon.hosted["s"].ready):
            await asyncio.sleep(0.02)
        target = sensor(daemon, name).reads + n
        while sensor(daemon, name).reads < target:
            await asyncio.sleep(0.02)


async def test_command_sensors(broker: PrivateBroker, realm: str) -> None:
    config = sensors_config(
        broker,
        realm,
        [
            {"name": "answer", "command": "echo 42", "unit": "x"},
            {"name": "nested", "command": """echo '{"a":{"b":3.5}}'""", "json_field": "a.b"},
            {"name": "scaled", "command": "echo 23125", "scale": 0.001, "unit": "°C"},
        ],
    )
    async with sensor_events(config) as (got, daemon):
        msg = await got.wait_for(named("answer"), timeout=5)
        event = decode(msg.payload, Event)
        assert (event.value, event.unit) == (42.0, "x")
        assert msg.topic == f"mtor/{realm}/event/{NODE_ID}/sensor/answer"
        await got.wait_for(named("nested", lambda e: e.value == 3.5), timeout=5)
        await got.wait_for(named("scaled", lambda e: e.value == 23.125), timeout=5)
        # Unchanged values are read again and again but published once.
        await reads_pass(daemon, "answer", 3)
        assert values(got, "answer") == [42.0]
        # The node advertises no task capabilities; it runs.
        assert daemon.capabilities() == []
        assert daemon.hosted["s"].job.status == "running"


async def test_file_sensor_deadband(broker: PrivateBroker, realm: str, tmp_path: Path) -> None:
    w1 = tmp_path / "w1_slave"
    w1.write_text(W1_SLAVE)
    config = sensors_config(
        broker,
        realm,
        [
            {
                "name": "outdoor",
                "file": str(w1),
                "regex": r"(?s)YES.*t=(-?\d+)",
                "scale": 0.001,
                "deadband": 0.5,
                "unit": "°C",
                "device_class": "temperature",
            }
        ],
    )
    async with sensor_events(config) as (got, daemon):
        msg = await got.wait_for(named("outdoor"), timeout=5)
        first = decode(msg.payload, Event)
        assert (first.value, first.unit, first.device_class) == (23.125, "°C", "temperature")
        w1.write_text(W1_SLAVE.replace("t=23125", "t=23400"))  # +0.275: inside the deadband
        await reads_pass(daemon, "outdoor", 3)
        w1.write_text(W1_SLAVE.replace("t=23125", "t=24000"))  # +0.875: beyond it
        await got.wait_for(named("outdoor", lambda e: e.value == 24.0), timeout=5)
        # Events arrive in order: had 23.4 been published it would be listed before 24.0.
        assert values(got, "outdoor") == [23.125, 24.0]


async def test_failing_sensor_does_not_stop_others(
    broker: PrivateBroker, realm: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later = tmp_path / "later"
    config = sensors_config(
        broker,
        realm,
        [
            {"name": "broken", "command": "echo oops >&2; exit 3"},
            {"name": "garbage", "command": "echo not-a-number"},
            {"name": "slow", "command": "sleep 5", "timeout": 0.3},
            {"name": "later", "file": str(later)},
            {"name": "good", "file": str(tmp_path / "good")},
        ],
    )
    (tmp_path / "good").write_text("1\n")
    caplog.set_level(logging.INFO, logger="nodes")
    async with sensor_events(config) as (got, daemon):
        broken = await got.wait_for(named("broken"), timeout=5)
        event = decode(broken.payload, Event)
        assert event.value is None
        assert event.attrs["error"] == "command exited with status 3: oops"
        garbage = decode((await got.wait_for(named("garbage"), timeout=5)).payload, Event)
        assert "not a number" in garbage.attrs["error"]
        slow = decode((await got.wait_for(named("slow"), timeout=5)).payload, Event)
        assert "timed out after 0.3s" in slow.attrs["error"]
        missing = decode((await got.wait_for(named("later"), timeout=5)).payload, Event)
        assert "cannot read" in missing.attrs["error"]
        # The good sensor goes on while the others keep failing.
        await reads_pass(daemon, "broken", 3)
        (tmp_path / "good").write_text("2\n")
        await got.wait_for(named("good", lambda e: e.value == 2.0), timeout=5)
        # A failing sensor recovers: its next good value is published.
        later.write_text("7")
        await got.wait_for(named("later", lambda e: e.value == 7.0), timeout=5)
        # One error event and one warning per failure streak, not one per read.
        assert sensor(daemon, "broken").failures >= 3
        assert len(values(got, "broken")) == 1
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and "broken" in r.getMessage()
        ]
        assert len(warnings) == 1
        assert any("sensor later recovered" in r.getMessage() for r in caplog.records)
        assert daemon.hosted["s"].job.status == "running"
        assert daemon.hosted["s"].job.restarts == 0


async def test_builtin_metrics(broker: PrivateBroker, realm: str) -> None:
    config = sensors_config(
        broker, realm, [], builtin=["cpu_temperature", "load", "memory", "disk", "uptime"]
    )
    expected = {"load": None, "memory": "%", "disk_root": "%", "uptime": "s"}
    if hostinfo.cpu_temperature() is not None:
        expected["cpu_temperature"] = "°C"
    async with sensor_events(config) as (got, _daemon):
        seen: dict[str, Event] = {}
        for name, unit in expected.items():
            event = decode((await got.wait_for(named(name), timeout=5)).payload, Event)
            assert event.unit == unit, name
            assert isinstance(event.value, float), name
            seen[name] = event
    assert 0 <= float(seen["memory"].value or 0) <= 100
    assert seen["memory"].attrs["total_mb"] > 0
    assert set(seen["load"].attrs) == {"load5", "load15"}
    assert seen["disk_root"].attrs == {"path": "/"}
    assert float(seen["uptime"].value or 0) > 0


async def test_heartbeat_republishes_unchanged(broker: PrivateBroker, realm: str) -> None:
    config = sensors_config(broker, realm, [{"name": "steady", "command": "echo 5"}], heartbeat=0.3)
    async with sensor_events(config) as (got, _daemon):
        async with asyncio.timeout(5):
            while len(values(got, "steady")) < 3:
                await got.wait_count(len(got.messages) + 1)
        assert set(values(got, "steady")) == {5.0}


# ------------------------------------------------------------ end to end


def test_mtor_node_and_events_processes(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    """`mtor node` (real process, config file) → broker → `mtor events --json` (real process)."""
    config_file = write_config(
        tmp_path,
        {
            "realm": realm,
            "node_id": "e2e",
            "broker": {"url": broker.url},
            "daemon": {"health_interval": 3600},
            "nodes": {
                "sensors": {
                    "type": "sensors",
                    "interval": 0.2,
                    "min_interval": 0,
                    # Repeats make the test independent of which process is up first.
                    "heartbeat": 0.4,
                    "builtin": ["memory"],
                    "sensors": [
                        {"name": "answer", "command": "echo 42"},
                        {
                            "name": "nested",
                            "command": """echo '{"a":{"b":3.5}}'""",
                            "json_field": "a.b",
                        },
                    ],
                }
            },
        },
    )
    node = MtorProcess(["node", "--config", str(config_file)])
    processes.append(node)
    events = subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli.main",
            "events",
            "e2e",
            "--json",
            "--count",
            "8",
            "--timeout",
            "15",
            "--broker",
            broker.url,
            "--realm",
            realm,
        ],
        env=mtor_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    rc, log = node.terminate()
    assert events.returncode == 0, events.stderr + log
    docs = [json.loads(line) for line in events.stdout.splitlines()]
    assert len(docs) == 8
    by_name: dict[str, set[Any]] = {}
    for doc in docs:
        assert doc["node_id"] == "e2e" and doc["domain"] == "sensor", doc
        by_name.setdefault(doc["name"], set()).add(doc.get("value"))
    assert by_name.get("answer") == {42.0}, docs
    assert by_name.get("nested") == {3.5}, docs
    assert "memory" in by_name, docs
    assert rc == 0, log
