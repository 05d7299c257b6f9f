"""The sensors node: host metrics, command sensors and file sensors as events.

Each sensor runs its own loop (one asyncio task each) that sleeps between
reads, so an idle node costs nothing but a few wake-ups per interval.  A
reading becomes ``event/<node_id>/sensor/<name>`` when :class:`PublishPolicy`
says so (deadband, minimum interval, heartbeat).  A sensor that fails logs one
warning per failure streak and publishes one event with ``attrs.error`` (value
``null``) when it starts failing; the other sensors are not affected.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from daemon import topics
from daemon.entities import EntitySpec
from daemon.node import Node, NodeContext
from daemon.protocol.node import Capability
from nodes.base import NodeConfigBase
from nodes.sensors.config import SensorsConfig
from nodes.sensors.policy import PublishPolicy
from nodes.sensors.readers import Reader, Reading, SensorError, builtin_readers, custom_reader

DOMAIN = "sensor"


@dataclass(slots=True)
class Sensor:
    """One sensor's reader, schedule and publish state."""

    reader: Reader
    interval: float
    policy: PublishPolicy
    error: str | None = None
    reads: int = 0
    failures: int = 0
    last: Reading | None = None  # the last published reading


# Builtin readings that the daemon's own diagnostics also show (they give way).
MEASURES: Final = {
    "load": "host.load",
    "memory": "host.memory",
    "cpu_temperature": "host.temperature",
}


class SensorsNode(Node):
    """Publishes host metrics and configured command / file sensors."""

    type_name = "sensors"

    def __init__(self, name: str, config: NodeConfigBase, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        assert isinstance(config, SensorsConfig)
        self.cfg = config
        self.sensors: list[Sensor] = []

    async def setup(self) -> None:
        cfg = self.cfg
        self.sensors = []
        for builtin in builtin_readers(cfg.builtin, cfg.disk_paths):
            if builtin.sample() is None:
                # No thermal zone in a container, no such mount...: fail soft.
                self.log.info("%s is not available on this host; not published", builtin.name)
                continue
            deadband = cfg.deadbands.get(builtin.kind, 0.0)
            self.sensors.append(self._sensor(builtin, cfg.interval, deadband))
        for spec in cfg.sensors:
            reader = custom_reader(spec)
            self.sensors.append(self._sensor(reader, spec.interval or cfg.interval, spec.deadband))
        self.log.info(
            "%d sensor(s): %s", len(self.sensors), ", ".join(s.reader.name for s in self.sensors)
        )

    def _sensor(self, reader: Reader, interval: float, deadband: float) -> Sensor:
        policy = PublishPolicy(deadband, self.cfg.min_interval, self.cfg.heartbeat)
        return Sensor(reader, interval, policy)

    def capabilities(self) -> list[Capability]:
        return []  # no tasks: the events are the product

    def entities(self) -> list[EntitySpec]:
        """One sensor entity per sensor that works here (after setup), on its event topic."""
        state_classes = {s.name: s.state_class for s in self.cfg.sensors}
        out = []
        for sensor in self.sensors:
            reader = sensor.reader
            topic = topics.EVENT.build(
                realm=self.ctx.realm, node_id=self.ctx.node_id, domain=DOMAIN, name=reader.name
            )
            out.append(
                EntitySpec(
                    component="sensor",
                    object_id=f"{self.name}_{reader.name}",
                    name=reader.name.replace("_", " ").capitalize(),
                    state_topic=topic,
                    device_class=reader.device_class,
                    unit=reader.unit,
                    state_class=state_classes.get(reader.name, "measurement"),
                    measures=MEASURES.get(getattr(reader, "kind", "")),
                )
            )
        return out

    async def run(self) -> None:
        if not self.sensors:
            await asyncio.Event().wait()
        async with asyncio.TaskGroup() as tg:
            for sensor in self.sensors:
                tg.create_task(self._watch(sensor), name=f"sensor:{sensor.reader.name}")

    async def _watch(self, sensor: Sensor) -> None:
        """Read at a fixed rate; a slow read delays the next one rather than piling up."""
        while True:
            started = time.monotonic()
            await self.poll(sensor)
            await asyncio.sleep(max(0.0, started + sensor.interval - time.monotonic()))

    async def poll(self, sensor: Sensor) -> None:
        """Read one sensor once and publish what the policy lets through."""
        name = sensor.reader.name
        sensor.reads += 1
        try:
            reading = await sensor.reader.read()
        except SensorError as exc:
            await self._failed(sensor, str(exc))
            return
        except Exception as exc:  # a bug in one reader must not stop the others
            self.log.exception("sensor %s: reader raised", name)
            await self._failed(sensor, f"{type(exc).__name__}: {exc}")
            return
        if sensor.error is not None:
            self.log.info("sensor %s recovered after %d failed read(s)", name, sensor.failures)
            sensor.error = None
            sensor.failures = 0
        now = time.monotonic()
        if sensor.policy.should_publish(reading.value, now):
            sensor.policy.published(reading.value, now)
            await self._publish(sensor, reading)

    async def republish(self) -> None:
        """Readings are events, not retained: send the last ones again for a new dashboard."""
        for sensor in self.sensors:
            if sensor.last is not None and sensor.error is None:
                await self._publish(sensor, sensor.last)

    async def _publish(self, sensor: Sensor, reading: Reading) -> None:
        sensor.last = reading
        reader = sensor.reader
        await self.ctx.publish_event(
            DOMAIN,
            reader.name,
            reading.value,
            unit=reader.unit,
            device_class=reader.device_class,
            attrs=reading.attrs,
        )

    async def _failed(self, sensor: Sensor, reason: str) -> None:
        sensor.failures += 1
        name = sensor.reader.name
        if sensor.error is not None:
            self.log.debug("sensor %s still failing: %s", name, reason)
            return
        sensor.error = reason
        sensor.policy.reset()
        self.log.warning("sensor %s failed: %s (logged once until it recovers)", name, reason)
        await self.ctx.publish_event(
            DOMAIN,
            name,
            None,
            unit=sensor.reader.unit,
            device_class=sensor.reader.device_class,
            attrs={"error": reason},
        )
