"""The swarm node: hosts one robot's :class:`~daemon.swarm.agent.RobotAgent`.

The robot's identity is the daemon's node id (its MQTT account): its bids,
claims and progress go out under ``swarm/<kind>/<node_id>``.  The driver is a
backend chosen in config and imported lazily (``mavlink`` needs pymavlink); a
missing package fails the node with a clear error and advertises nothing.

Besides the swarm topics, the robot's status, battery and pose are events
(``event/<node_id>/robot/status``, ``.../battery``, retained) for dashboards and
Home Assistant, where it is a device tracker (on the map when it has a GNSS
fix) with a "Return home" button (and "Fail" with the simulator, to try
re-auctions).
"""

from __future__ import annotations

from typing import Any

from daemon import topics
from daemon.entities import EntitySpec
from daemon.errors import TaskError
from daemon.node import Node, NodeContext
from daemon.plugins import NodeConfigBase
from daemon.protocol.node import Capability
from daemon.protocol.swarm import Point, RobotProfile, RobotState
from daemon.swarm.agent import RobotAgent, Vehicle
from daemon.swarm.auction import Timing
from daemon.worker import TaskRun
from nodes.swarm.config import SwarmConfig

DOMAIN = "robot"
CAPABILITY = "swarm.robot"
# Home Assistant's device tracker from the robot's retained state: a map position
# from the GNSS fix when it has one (MAVLink vehicles); the local frame's x / y,
# status and battery as attributes always.
TRACKER_ATTRIBUTES = (
    "{% set s = value_json %}"
    "{% set a = {'x': s.pose.x, 'y': s.pose.y, 'status': s.status,"
    " 'battery_level': s.battery_percent, 'heading': s.heading_deg} %}"
    "{% if s.get('geo') %}{% set a = dict(a, latitude=s.geo.lat, longitude=s.geo.lon,"
    " gps_accuracy=5) %}{% endif %}"
    "{{ a | tojson }}"
)


class SwarmNode(Node):
    type_name = "swarm"

    def __init__(self, name: str, config: NodeConfigBase, ctx: NodeContext) -> None:
        super().__init__(name, config, ctx)
        assert isinstance(config, SwarmConfig)
        self.cfg = config
        self.vehicle: Vehicle | None = None
        self.agent: RobotAgent | None = None
        self.home: Point | None = None
        self._published: tuple[str, int] | None = None

    def profile(self) -> RobotProfile:
        d = self.cfg.driver
        if d.type == "sim":
            speed, range_m = d.speed_mps, 100.0 / d.drain_percent_per_m
        else:
            speed, range_m = d.speed_mps, d.range_m
        return RobotProfile(
            platform=self.cfg.platform,
            sensors=list(self.cfg.sensors),
            payload_kg=self.cfg.payload_kg,
            max_speed_mps=speed,
            range_m=range_m,
            driver=d.type,
        )

    async def setup(self) -> None:
        d = self.cfg.driver
        if d.type == "sim":
            from nodes.swarm.sim import SimVehicle

            self.vehicle = SimVehicle(d, self.profile())
        else:
            try:
                from nodes.swarm.mavlink import MavlinkVehicle
            except ImportError as exc:
                raise RuntimeError(
                    f"the mavlink driver needs pymavlink ({exc}): ./install.sh, or "
                    "pip install 'mtor[swarm]'"
                ) from exc
            vehicle = MavlinkVehicle(d, self.profile())
            await vehicle.connect()
            self.vehicle = vehicle
        self.home = self.vehicle.state().pose

    def capabilities(self) -> list[Capability]:
        if self.vehicle is None:
            return []
        return [
            Capability(
                name=CAPABILITY,
                node=self.name,
                backend=self.cfg.driver.type,
                attrs=self.profile().model_dump(),
            )
        ]

    def entities(self) -> list[EntitySpec]:
        def event(name: str) -> str:
            return topics.EVENT.build(
                realm=self.ctx.realm, node_id=self.ctx.node_id, domain=DOMAIN, name=name
            )

        def command(object_id: str) -> str:
            return topics.ENTITY_SET.build(
                realm=self.ctx.realm, node_id=self.ctx.node_id, object_id=object_id
            )

        robot = topics.SWARM_ROBOT.build(realm=self.ctx.realm, sender=self.ctx.node_id)
        out = [
            EntitySpec(
                "device_tracker",
                f"{self.name}_position",
                "Robot position",
                icon="mdi:robot",
                extra={
                    "json_attributes_topic": robot,  # its retained swarm state
                    "json_attributes_template": TRACKER_ATTRIBUTES,
                    "source_type": "gps",
                },
            ),
            EntitySpec("sensor", f"{self.name}_status", "Robot status", event("status")),
            EntitySpec(
                "sensor",
                f"{self.name}_battery",
                "Robot battery",
                event("battery"),
                device_class="battery",
                unit="%",
                state_class="measurement",
            ),
            EntitySpec(
                "button",
                f"{self.name}_return_home",
                "Return home",
                command_topic=command(f"{self.name}_return_home"),
                on_command=self._return_home,
            ),
        ]
        if self.cfg.driver.type == "sim":
            out.append(
                EntitySpec(
                    "button",
                    f"{self.name}_fail",
                    "Fail (simulated)",
                    command_topic=command(f"{self.name}_fail"),
                    on_command=self._fail,
                    diagnostic=True,
                )
            )
        return out

    async def _return_home(self, _value: Any) -> None:
        if self.agent is None or self.vehicle is None or self.home is None:
            return
        await self.agent.recall()
        await self.vehicle.go([self.home], lambda _m: None)
        await self.agent.publish_state(force=True)

    async def _fail(self, _value: Any) -> None:
        fail = getattr(self.vehicle, "fail", None)
        if fail is not None:
            fail()

    async def _on_state(self, state: RobotState) -> None:
        sig = (state.status, round(state.battery_percent))
        if sig == self._published:
            return
        self._published = sig
        attrs: dict[str, Any] = {
            "x": state.pose.x,
            "y": state.pose.y,
            "z": state.pose.z,
            "heading_deg": state.heading_deg,
            "speed_mps": state.speed_mps,
        }
        if state.mission is not None:
            attrs["mission"] = state.mission.mission
        await self.ctx.publish_event(DOMAIN, "status", state.status, attrs=attrs, retain=True)
        await self.ctx.publish_event(
            DOMAIN, "battery", round(state.battery_percent, 1), unit="%", retain=True
        )

    async def run(self) -> None:
        assert self.vehicle is not None
        if self.agent is None:  # made once: its subscriptions live as long as the node
            timing = Timing(settle_s=self.cfg.settle_s, award_timeout_s=self.cfg.award_timeout_s)
            self.agent = RobotAgent(
                self.ctx.bus,
                self.ctx.realm,
                self.ctx.node_id,
                self.vehicle,
                heartbeat_s=self.cfg.heartbeat_s,
                reserve_percent=self.cfg.reserve_percent,
                timing=timing,
                on_state=self._on_state,
            )
        self.agent.vehicle = self.vehicle  # a restart made a new one
        await self.agent.run()

    async def execute(self, task: TaskRun) -> Any:
        raise TaskError("unavailable", "missions come by auction (swarm/mission), not as tasks")

    async def close(self) -> None:
        if self.vehicle is not None:
            await self.vehicle.close()
