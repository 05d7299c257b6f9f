"""The MAVLink driver against a loopback vehicle that speaks real MAVLink over UDP
(pymavlink on both ends): heartbeat, GLOBAL_POSITION_INT, SYS_STATUS, the mission
upload handshake (MISSION_COUNT / MISSION_REQUEST_INT / MISSION_ITEM_INT /
MISSION_ACK), MISSION_START with its COMMAND_ACK, MISSION_ITEM_REACHED; then a
MAVLink robot wins a mission in a peer-run auction on the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
import uuid
from typing import Any

import pytest

pytest.importorskip("pymavlink")

from pymavlink import mavutil

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.protocol.swarm import MissionAnnounce, Point, RobotProfile
from daemon.swarm.agent import RobotAgent, VehicleError
from daemon.swarm.auction import Timing
from daemon.swarm.watch import Watcher, announce
from nodes.swarm.config import MavlinkDriverConfig
from nodes.swarm.mavlink import EARTH_M_PER_DEG, MavlinkVehicle

MAV = mavutil.mavlink
HOME = (47.3977, 8.5456)  # lat, lon
STEP_S = 0.05


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopbackVehicle(threading.Thread):
    """A copter that flies its uploaded waypoints in straight lines at ``speed``."""

    def __init__(self, port: int, *, speed: float = 60.0, refuse: bool = False) -> None:
        super().__init__(daemon=True)
        self.conn = mavutil.mavlink_connection(
            f"udpout:127.0.0.1:{port}", source_system=1, source_component=1
        )
        self.speed, self.refuse = speed, refuse
        self.x = self.y = 0.0
        self.battery = 90.0
        self.items: list[Any] = []
        self.expected = 0
        self.current: int | None = None
        self.received: list[str] = []
        self.stop = threading.Event()

    def geo(self) -> tuple[float, float]:
        lat = HOME[0] + self.y / EARTH_M_PER_DEG
        return lat, HOME[1] + self.x / (EARTH_M_PER_DEG * math.cos(math.radians(HOME[0])))

    def local(self, item: Any) -> tuple[float, float]:
        lat, lon = item.x / 1e7, item.y / 1e7
        x = (lon - HOME[1]) * EARTH_M_PER_DEG * math.cos(math.radians(HOME[0]))
        return x, (lat - HOME[0]) * EARTH_M_PER_DEG

    def run(self) -> None:
        mav = self.conn.mav
        while not self.stop.is_set():
            mav.heartbeat_send(MAV.MAV_TYPE_QUADROTOR, MAV.MAV_AUTOPILOT_ARDUPILOTMEGA, 0, 0, 4)
            lat, lon = self.geo()
            mav.global_position_int_send(
                0, round(lat * 1e7), round(lon * 1e7), 500_000, 10_000, 0, 0, 0, 9000
            )
            mav.sys_status_send(0, 0, 0, 0, 12000, -1, int(self.battery), 0, 0, 0, 0, 0, 0)
            while (msg := self.conn.recv_match(blocking=False)) is not None:
                self.handle(msg)
            self.fly()
            time.sleep(STEP_S)

    def handle(self, msg: Any) -> None:
        kind = msg.get_type()
        self.received.append(kind)
        mav, src = self.conn.mav, (msg.get_srcSystem(), msg.get_srcComponent())
        if kind == "MISSION_COUNT":
            if self.refuse:
                mav.mission_ack_send(*src, MAV.MAV_MISSION_DENIED)
                return
            self.items, self.expected = [None] * msg.count, msg.count
            mav.mission_request_int_send(*src, 0)
        elif kind == "MISSION_ITEM_INT" and msg.seq < self.expected:
            self.items[msg.seq] = msg
            if msg.seq + 1 < self.expected:
                mav.mission_request_int_send(*src, msg.seq + 1)
            else:
                mav.mission_ack_send(*src, MAV.MAV_MISSION_ACCEPTED)
        elif kind == "COMMAND_LONG" and msg.command == MAV.MAV_CMD_MISSION_START:
            self.current = 0 if self.items else None
            mav.command_ack_send(msg.command, MAV.MAV_RESULT_ACCEPTED)
        elif kind == "COMMAND_LONG" and msg.command == MAV.MAV_CMD_DO_PAUSE_CONTINUE:
            self.current = None
            mav.command_ack_send(msg.command, MAV.MAV_RESULT_ACCEPTED)

    def fly(self) -> None:
        if self.current is None:
            return
        tx, ty = self.local(self.items[self.current])
        d = math.hypot(tx - self.x, ty - self.y)
        step = self.speed * STEP_S
        if d <= step:
            self.x, self.y = tx, ty
            self.conn.mav.mission_item_reached_send(self.current)
            self.current = self.current + 1 if self.current + 1 < len(self.items) else None
        else:
            self.x += (tx - self.x) * step / d
            self.y += (ty - self.y) * step / d
        self.battery = max(0.0, self.battery - 0.001 * min(d, step))

    def close(self) -> None:
        self.stop.set()
        self.join(2)
        self.conn.close()


PROFILE = RobotProfile(platform="air", max_speed_mps=60, range_m=50_000, driver="mavlink")


@contextlib.asynccontextmanager
async def linked(**vehicle: Any) -> Any:
    port = free_udp_port()
    loop_vehicle = LoopbackVehicle(port, **vehicle)
    loop_vehicle.start()
    cfg = MavlinkDriverConfig(url=f"udpin:127.0.0.1:{port}", connect_timeout_s=5)
    driver = MavlinkVehicle(cfg, PROFILE)
    try:
        await driver.connect()
        yield loop_vehicle, driver
    finally:
        await driver.close()
        loop_vehicle.close()


async def test_mavlink_driver_uploads_flies_and_reports_against_the_loopback_vehicle() -> None:
    async with linked() as (vehicle, driver):
        state = driver.state()
        assert state.fault is None and state.battery_percent == 90.0
        assert state.geo is not None and abs(state.geo.lat - HOME[0]) < 1e-6
        moved: list[float] = []
        wps = [Point(x=30, y=0), Point(x=30, y=40)]
        async with asyncio.timeout(10):
            await driver.go(wps, moved.append)
        assert [round(vehicle.local(i)[0]) for i in vehicle.items] == [30, 30]
        assert [round(vehicle.local(i)[1]) for i in vehicle.items] == [0, 40]
        assert all(i.command == MAV.MAV_CMD_NAV_WAYPOINT for i in vehicle.items)
        assert {"MISSION_COUNT", "MISSION_ITEM_INT", "COMMAND_LONG"} <= set(vehicle.received)
        await asyncio.sleep(0.3)  # the next position report
        pose = driver.state().pose
        assert math.hypot(pose.x - 30, pose.y - 40) < 1.0, pose
        assert moved and moved[-1] == pytest.approx(70, abs=2)


async def test_a_refused_mission_and_a_lost_link_are_vehicle_errors() -> None:
    async with linked(refuse=True) as (_vehicle, driver):
        with pytest.raises(VehicleError, match="refused the mission"):
            await driver.go([Point(x=5, y=5)], lambda _m: None)
    async with linked(speed=1.0) as (vehicle, driver):
        go = asyncio.create_task(driver.go([Point(x=500, y=0)], lambda _m: None))
        await asyncio.sleep(0.5)
        vehicle.stop.set()  # the vehicle goes silent: no heartbeat any more
        with pytest.raises(VehicleError, match="link lost"):
            async with asyncio.timeout(8):
                await go


async def test_a_mavlink_robot_wins_and_flies_a_peer_run_mission(broker: PrivateBroker) -> None:
    from tests.conftest import make_config

    realm = "t" + uuid.uuid4().hex[:10]
    config = make_config(broker.url, realm)
    buses = [Bus(config.broker, f"t-{n}-{uuid.uuid4().hex[:6]}") for n in ("drone", "cli")]
    runs = [asyncio.create_task(b.run()) for b in buses]
    async with linked() as (_vehicle, driver):
        timing = Timing(settle_s=0.1, award_timeout_s=1.0)
        agent = RobotAgent(buses[0], realm, "drone1", driver, heartbeat_s=0.3, timing=timing)
        watcher = Watcher(buses[1], realm, timing=timing)
        try:
            for b in buses:
                await b.wait_connected(5)
            work = asyncio.create_task(agent.run())
            await watcher.start()
            await asyncio.sleep(0.3)  # the agent subscribed
            mission = MissionAnnounce(mission="survey", target=Point(x=20, y=20, z=15))
            await announce(buses[1], realm, "alice", mission)
            w = watcher.get("alice", "survey")
            async with asyncio.timeout(15):
                await w.finished.wait()
            auction = watcher.auction("alice", "survey")
            assert auction is not None and auction.finished == "done"
            assert auction.sectors[0].winners == ["drone1"]
            assert math.hypot(driver.state().pose.x - 20, driver.state().pose.y - 20) < 2
        finally:
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            for r in runs:
                r.cancel()
            for r in runs:
                with contextlib.suppress(asyncio.CancelledError):
                    await r
