"""The MAVLink driver: an ArduPilot / PX4 vehicle through pymavlink.

What it speaks (the MAVLink common set, as a ground station does):

* listens for the vehicle's ``HEARTBEAT`` (its system and component id), and
  takes its state from ``GLOBAL_POSITION_INT`` (position, velocity, heading) and
  ``SYS_STATUS`` (``battery_remaining``); a heartbeat missing for
  :data:`LINK_LOST_S` is a fault;
* uploads a mission with the mission protocol: ``MISSION_COUNT`` → the vehicle's
  ``MISSION_REQUEST_INT`` (or ``MISSION_REQUEST``) per item → ``MISSION_ITEM_INT``
  (``MAV_CMD_NAV_WAYPOINT``, global frame, relative altitude) → ``MISSION_ACK``;
* starts it with ``COMMAND_LONG`` ``MAV_CMD_MISSION_START`` (``COMMAND_ACK``)
  and follows ``MISSION_ITEM_REACHED`` to the last item;
* pauses it (``MAV_CMD_DO_PAUSE_CONTINUE``) when the work is cancelled.

The realm's local frame (metres east / north of ``home``) maps to latitude and
longitude by an equirectangular projection around ``home`` (the first fix unless
configured): exact enough over the few kilometres a swarm covers.

pymavlink is blocking: one reader thread receives every message and hands it to
the event loop; sends go through ``asyncio.to_thread`` under one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from pymavlink import mavutil

from daemon.protocol.swarm import GeoFix, Point, RobotProfile
from daemon.swarm.agent import VehicleError, VehicleState
from nodes.swarm.config import MavlinkDriverConfig

log = logging.getLogger(__name__)

EARTH_M_PER_DEG: Final = 111_319.49  # metres per degree of latitude (WGS-84 mean)
LINK_LOST_S: Final = 3.0  # no heartbeat for this long: the link (or vehicle) is gone
RECV_TIMEOUT_S: Final = 0.2  # the reader thread wakes this often to notice close()
SYS_STATUS_WAIT_S: Final = 1.0  # ArduPilot and PX4 send it at 1 Hz or more
MAV: Final = mavutil.mavlink


class MavlinkVehicle:
    def __init__(self, cfg: MavlinkDriverConfig, profile: RobotProfile) -> None:
        self.cfg = cfg
        self.profile = profile
        self.conn: Any = None
        self.target: tuple[int, int] = (1, 1)
        self.home: tuple[float, float, float] | None = cfg.home
        self.geo: GeoFix | None = None
        self.pose = Point(x=0.0, y=0.0)
        self.battery = 100.0
        self.heading = 0.0
        self.speed = 0.0
        self.last_heartbeat = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[Callable[[Any], bool], asyncio.Future[Any]]] = []
        self._reached: asyncio.Queue[int] = asyncio.Queue()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------ link

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg

        def open_link() -> Any:
            conn = mavutil.mavlink_connection(cfg.url, source_system=cfg.source_system)
            hb = conn.wait_heartbeat(timeout=cfg.connect_timeout_s)
            if hb is None:
                conn.close()
                raise VehicleError(f"no MAVLink heartbeat on {cfg.url} in {cfg.connect_timeout_s}s")
            return conn

        self.conn = await asyncio.to_thread(open_link)
        self.target = (self.conn.target_system, self.conn.target_component)
        self.last_heartbeat = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="mavlink-reader", daemon=True)
        self._reader.start()
        await self.wait_for(lambda m: m.get_type() == "GLOBAL_POSITION_INT", cfg.connect_timeout_s)
        with contextlib.suppress(VehicleError):  # a battery level, if the vehicle reports one
            await self.wait_for(lambda m: m.get_type() == "SYS_STATUS", SYS_STATUS_WAIT_S)
        log.info("MAVLink vehicle %d/%d on %s", *self.target, cfg.url)

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.conn.recv_match(blocking=True, timeout=RECV_TIMEOUT_S)
            except Exception as exc:  # a closed socket on shutdown, a garbled frame
                if self._stop.is_set():
                    return
                log.debug("MAVLink receive failed: %s", exc)
                continue
            if msg is None or msg.get_type() == "BAD_DATA":
                continue
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._on_message, msg)

    def _on_message(self, msg: Any) -> None:
        kind = msg.get_type()
        if kind == "HEARTBEAT" and msg.get_srcSystem() == self.target[0]:
            self.last_heartbeat = time.monotonic()
        elif kind == "GLOBAL_POSITION_INT":
            self._position(msg)
        elif kind == "SYS_STATUS" and msg.battery_remaining >= 0:
            self.battery = float(msg.battery_remaining)
        elif kind == "MISSION_ITEM_REACHED":
            self._reached.put_nowait(int(msg.seq))
        for predicate, fut in list(self._waiters):
            if not fut.done() and predicate(msg):
                fut.set_result(msg)

    def _position(self, msg: Any) -> None:
        lat, lon, alt = msg.lat / 1e7, msg.lon / 1e7, msg.relative_alt / 1000.0
        if self.home is None:
            self.home = (lat, lon, msg.alt / 1000.0 - alt)
        self.geo = GeoFix(lat=lat, lon=lon, alt=msg.alt / 1000.0)
        self.pose = self.to_local(lat, lon, alt)
        self.speed = math.hypot(msg.vx, msg.vy) / 100.0
        if msg.hdg != 65535:
            self.heading = (msg.hdg / 100.0) % 360

    def to_local(self, lat: float, lon: float, alt: float) -> Point:
        lat0, lon0, _ = self.home or (lat, lon, 0.0)
        x = (lon - lon0) * EARTH_M_PER_DEG * math.cos(math.radians(lat0))
        y = (lat - lat0) * EARTH_M_PER_DEG
        return Point(x=x, y=y, z=alt)

    def to_geo(self, p: Point) -> tuple[float, float]:
        lat0, lon0, _ = self.home or (0.0, 0.0, 0.0)
        lat = lat0 + p.y / EARTH_M_PER_DEG
        lon = lon0 + p.x / (EARTH_M_PER_DEG * math.cos(math.radians(lat0)))
        return lat, lon

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError as exc:
            raise VehicleError(f"the vehicle did not answer within {timeout:g}s") from exc
        finally:
            self._waiters.remove(entry)

    async def _send(self, name: str, *args: Any) -> None:
        def send() -> None:
            with self._send_lock:
                getattr(self.conn.mav, f"{name}_send")(*args)

        await asyncio.to_thread(send)

    # ------------------------------------------------------------ Vehicle

    def state(self) -> VehicleState:
        lost = self.conn is not None and time.monotonic() - self.last_heartbeat > LINK_LOST_S
        return VehicleState(
            pose=self.pose,
            battery_percent=self.battery,
            heading_deg=self.heading,
            speed_mps=self.speed,
            geo=self.geo,
            fault="MAVLink link lost" if lost else None,
        )

    async def go(self, waypoints: list[Point], progress: Callable[[float], None]) -> None:
        if self.conn is None:
            raise VehicleError("not connected")
        await self.upload(waypoints)
        while not self._reached.empty():
            self._reached.get_nowait()
        sys_id, comp_id = self.target
        await self._send(
            "command_long", sys_id, comp_id, MAV.MAV_CMD_MISSION_START, 0, 0, 0, 0, 0, 0, 0, 0
        )
        ack = await self.wait_for(
            lambda m: m.get_type() == "COMMAND_ACK" and m.command == MAV.MAV_CMD_MISSION_START,
            self.cfg.reply_timeout_s,
        )
        if ack.result != MAV.MAV_RESULT_ACCEPTED:
            raise VehicleError(f"the vehicle refused MISSION_START (result {ack.result})")
        try:
            await self._follow(waypoints, progress)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._send(
                    "command_long", sys_id, comp_id, MAV.MAV_CMD_DO_PAUSE_CONTINUE,
                    0, 0, 0, 0, 0, 0, 0, 0,
                )  # fmt: skip
            raise

    async def upload(self, waypoints: list[Point]) -> None:
        """The mission protocol's upload handshake, item by item as requested."""
        sys_id, comp_id = self.target
        n = len(waypoints)
        await self._send("mission_count", sys_id, comp_id, n)
        sent: set[int] = set()
        while True:
            msg = await self.wait_for(
                lambda m: m.get_type() in ("MISSION_REQUEST_INT", "MISSION_REQUEST", "MISSION_ACK"),
                self.cfg.reply_timeout_s,
            )
            if msg.get_type() == "MISSION_ACK":
                if msg.type != MAV.MAV_MISSION_ACCEPTED:
                    raise VehicleError(f"the vehicle refused the mission (MISSION_ACK {msg.type})")
                if len(sent) < n:
                    raise VehicleError(f"mission accepted after {len(sent)} of {n} items")
                return
            seq = int(msg.seq)
            if not 0 <= seq < n:
                raise VehicleError(f"the vehicle asked for item {seq} of {n}")
            lat, lon = self.to_geo(waypoints[seq])
            alt = waypoints[seq].z or self.cfg.altitude_m
            await self._send(
                "mission_item_int", sys_id, comp_id, seq, MAV.MAV_FRAME_GLOBAL_RELATIVE_ALT_INT,
                MAV.MAV_CMD_NAV_WAYPOINT, 0, 1, 0, self.cfg.arrive_m, 0, math.nan,
                round(lat * 1e7), round(lon * 1e7), alt,
            )  # fmt: skip
            sent.add(seq)

    async def _follow(self, waypoints: list[Point], progress: Callable[[float], None]) -> None:
        start = self.pose
        legs = [start, *waypoints]
        lengths = [math.dist((a.x, a.y), (b.x, b.y)) for a, b in itertools.pairwise(legs)]
        last = len(waypoints) - 1
        reached = -1
        while reached < last:
            try:
                async with asyncio.timeout(LINK_LOST_S / 3):
                    reached = max(reached, await self._reached.get())
            except TimeoutError:
                pass
            fault = self.state().fault
            if fault is not None:
                raise VehicleError(fault)
            done = sum(lengths[: reached + 1])
            if reached < last:  # part of the leg to the next item
                here, nxt = self.pose, waypoints[reached + 1]
                to_go = math.dist((here.x, here.y), (nxt.x, nxt.y))
                done += max(0.0, lengths[reached + 1] - to_go)
            progress(done)

    async def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 2.0)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None
