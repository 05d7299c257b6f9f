"""The swarm on a real Mosquitto: simulated robots as real `mtor node` processes,
missions announced with `mtor mission`, a winner killed with kill -9 and its
mission re-auctioned; the same without any orchestrator (there is none here) and
with the CLI as the auctioneer; hostile messages; robots in one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon import topics
from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.config import Config
from daemon.messages import decode
from daemon.protocol.node import Event, NodeState
from daemon.protocol.swarm import (
    Area,
    Award,
    MissionAck,
    MissionAnnounce,
    MissionProgress,
    Point,
    RobotProfile,
)
from daemon.swarm.agent import RobotAgent
from daemon.swarm.auction import Timing
from daemon.swarm.watch import Watcher, announce
from nodes.swarm.config import SimDriverConfig
from nodes.swarm.sim import SimVehicle
from tests.conftest import ROOT, Collector, MtorProcess, make_config, mtor_env, write_config

pytestmark = pytest.mark.slow

# A generous award timeout: on a loaded machine a late claim must not look like a
# silent winner (it only slows down the paths where a winner really is silent).
FAST = Timing(settle_s=0.1, award_timeout_s=2.0, misses=3)


def robot_config(broker: PrivateBroker, realm: str, node_id: str, x: float, **sim: Any) -> dict:  # type: ignore[type-arg]
    return {
        "realm": realm,
        "node_id": node_id,
        "broker": {"url": broker.url},
        "daemon": {"health_interval": 3600, "state_dir": f"state-{node_id}"},
        "homeassistant": {"enabled": False},
        "nodes": {
            "robot": {
                "type": "swarm",
                "sensors": ["camera"],
                "heartbeat_s": 0.3,
                "settle_s": 0.1,
                "award_timeout_s": 2.0,
                "driver": {"type": "sim", "start": [x, 0.0], "speed_mps": 40.0, **sim},
            }
        },
    }


def mission_cli(broker: PrivateBroker, realm: str, *args: str, timeout: float = 30) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "mission", "announce", "--broker", broker.url,
         "--realm", realm, "--json", *args],
        env=mtor_env(), cwd=ROOT, capture_output=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.stdout, out.stderr.decode()
    return out.returncode, json.loads(out.stdout.decode().strip().splitlines()[-1])


async def wait_robots(config: Config, ids: set[str], timeout: float = 20) -> None:
    """Until every robot published its retained state (its node runs)."""
    seen: set[str] = set()
    got = asyncio.Event()

    async def on(msg: Inbound) -> None:
        fields = topics.SWARM_ROBOT.parse(msg.topic)
        if fields and msg.payload:
            seen.add(fields["sender"])
            if ids <= seen:
                got.set()

    bus = Bus(config.broker, f"t-{time.monotonic_ns()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        await bus.subscribe(topics.SWARM_ROBOT.filter(realm=config.realm), on)
        async with asyncio.timeout(timeout):
            await got.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def start_robots(
    tmp_path: Path, broker: PrivateBroker, realm: str, xs: dict[str, float], **sim: Any
) -> dict[str, MtorProcess]:
    procs = {}
    for node_id, x in xs.items():
        d = tmp_path / node_id
        d.mkdir()
        path = write_config(d, robot_config(broker, realm, node_id, x, **sim))
        procs[node_id] = MtorProcess(["node", "--config", str(path)], cwd=d)
    return procs


# ------------------------------------------------------------------ real processes


def test_robot_processes_auction_among_themselves_and_reauction_after_kill9(
    tmp_path: Path, broker: PrivateBroker, realm: str, processes: list[MtorProcess]
) -> None:
    procs = start_robots(tmp_path, broker, realm, {"r1": 0.0, "r2": 50.0, "r3": 100.0})
    processes.extend(procs.values())
    asyncio.run(wait_robots(make_config(broker.url, realm), set(procs)))

    # nearest wins (r2 at x=50 for x=60), no orchestrator anywhere
    rc, out = mission_cli(broker, realm, "--at", "60,0", "--id", "near")
    assert rc == 0 and out["status"] == "done", out
    assert out["sectors"][0]["winner"] == "r2" and out["rounds"] == 1
    assert out["sectors"][0]["awarded_s"] < 2.0

    # the same with the CLI as the auctioneer (still no orchestrator)
    rc, out = mission_cli(broker, realm, "--at", "0,10", "--id", "central", "--auctioneer", "self")
    assert rc == 0 and out["status"] == "done" and out["sectors"][0]["winner"] == "r1", out

    # a long mission for r3; it is killed on the way: r2 takes over in a later round
    cli = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", "mission", "announce", "--broker", broker.url,
         "--realm", realm, "--json", "--at", "400,0", "--id", "far", "--timeout", "40"],
        env=mtor_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        asyncio.run(_wait_for_holder(make_config(broker.url, realm), "far", "r3"))
        procs["r3"].kill9()
        stdout, stderr = cli.communicate(timeout=45)
    finally:
        if cli.poll() is None:
            cli.kill()
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    assert cli.returncode == 0, (summary, stderr.decode()[-2000:])
    sector = summary["sectors"][0]
    assert sector["winners"][0] == "r3" and sector["winner"] == "r2", summary
    assert summary["rounds"] >= 2
    assert any("r3 dropped out" in text for _, text in summary["timeline"]), summary


async def _wait_for_holder(config: Config, mission: str, node: str) -> None:
    """Until ``node`` acknowledged ``mission`` and reported progress."""
    got = asyncio.Event()

    async def on(msg: Inbound) -> None:
        if msg.topic == topics.SWARM_PROGRESS.build(realm=config.realm, sender=node):
            p = decode(msg.payload, MissionProgress)
            if p.mission == mission and p.fraction > 0:
                got.set()

    bus = Bus(config.broker, f"t-{time.monotonic_ns()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(5)
        await bus.subscribe(topics.SWARM_PROGRESS.filter(realm=config.realm), on)
        async with asyncio.timeout(20):
            await got.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ------------------------------------------------------------------ robots in one process


@contextlib.asynccontextmanager
async def fleet(
    config: Config, spots: dict[str, tuple[float, float]], **sim: Any
) -> AsyncIterator[dict[str, RobotAgent]]:
    """Simulated robots with a bus (and will) each, plus their tasks; yields once all
    of them are subscribed and have published their state."""
    realm = config.realm
    agents: dict[str, RobotAgent] = {}
    tasks: list[asyncio.Task[None]] = []
    for node_id, (x, y) in spots.items():
        will_topic = topics.NODE_STATE.build(realm=realm, node_id=node_id)
        will = NodeState(state="offline", boot_id="b1")
        bus = Bus(config.broker, f"{node_id}-{time.monotonic_ns()}", will=(will_topic, will))
        profile = RobotProfile(max_speed_mps=50, range_m=10_000, sensors=["camera"])
        vehicle = SimVehicle(SimDriverConfig(start=(x, y), speed_mps=50, **sim), profile)
        agents[node_id] = RobotAgent(bus, realm, node_id, vehicle, heartbeat_s=0.3, timing=FAST)
        tasks.append(asyncio.create_task(bus.run()))
    for agent in agents.values():
        await agent.bus.wait_connected(5)
        tasks.append(asyncio.create_task(agent.run()))
    try:
        await wait_robots(config, set(spots))
        yield agents
    finally:
        for t in reversed(tasks):
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@contextlib.asynccontextmanager
async def watching(config: Config) -> AsyncIterator[tuple[Bus, Watcher, Collector]]:
    bus = Bus(config.broker, f"watch-{time.monotonic_ns()}")
    task = asyncio.create_task(bus.run())
    wire = Collector()
    try:
        await bus.wait_connected(5)
        watcher = Watcher(bus, config.realm, timing=FAST)
        await watcher.start()
        await bus.subscribe(topics.SWARM_ANY.filter(realm=config.realm), wire)
        yield bus, watcher, wire
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def kinds(wire: Collector, kind: str, mission: str) -> list[tuple[str, Any]]:
    """(sender, message) of one kind for one mission, from the wire."""
    cls = {"ack": MissionAck, "award": Award}[kind]
    out = []
    for m in wire.messages:
        f = topics.SWARM_ANY.parse(m.topic)
        if f and f["kind"] == kind:
            msg = decode(m.payload, cls)
            if msg.mission == mission:
                out.append((f["sender"], msg))
    return out


async def test_equal_costs_one_award_one_ack_lowest_id_wins(config: Config) -> None:
    spots = {"rc": (10.0, 10.0), "ra": (10.0, 10.0), "rb": (10.0, 10.0)}
    async with fleet(config, spots) as _agents, watching(config) as (bus, watcher, wire):
        await announce(
            bus, config.realm, "alice", MissionAnnounce(mission="tie", target=Point(x=0, y=0))
        )
        async with asyncio.timeout(10):
            await watcher.get("alice", "tie").finished.wait()
        await asyncio.sleep(0.3)  # anything late would show now
        assert [s for s, _ in kinds(wire, "award", "tie")] == ["ra"]
        assert [s for s, _ in kinds(wire, "ack", "tie")] == ["ra"]


async def test_coverage_sectors_one_per_robot_and_failure_is_reauctioned(config: Config) -> None:
    spots = {"w": (0.0, 0.0), "m": (60.0, 0.0), "e": (120.0, 0.0)}
    async with fleet(config, spots) as agents, watching(config) as (bus, watcher, _wire):
        area = MissionAnnounce(
            mission="cover", target=Area(x0=0, y0=0, x1=120, y1=20), sectors=3, bid_window_s=0.3
        )
        await announce(bus, config.realm, "alice", area)
        async with asyncio.timeout(15):
            await watcher.get("alice", "cover").finished.wait()
        auction = watcher.auction("alice", "cover")
        assert auction is not None and auction.finished == "done"
        assert [s.winners for s in auction.sectors] == [["w"], ["m"], ["e"]]

        # m fails its next mission on the way: it is re-auctioned without m
        agents["m"].vehicle.fail("stalled motor")  # type: ignore[attr-defined]
        point = MissionAnnounce(mission="p", target=Point(x=60, y=30), bid_window_s=0.3)
        await announce(bus, config.realm, "alice", point)
        async with asyncio.timeout(15):
            await watcher.get("alice", "p").finished.wait()
        auction = watcher.auction("alice", "p")
        assert auction is not None and auction.finished == "done"
        assert auction.sectors[0].winners[0] == "m" and auction.sectors[0].winners[-1] != "m"
        assert auction.round == 2 and "m" in auction.excluded


async def test_auctioneer_runs_the_auction_and_reawards_a_failure(config: Config) -> None:
    from daemon.swarm.auctioneer import Auctioneer, MissionRecord

    records: list[MissionRecord] = []

    async def record(r: MissionRecord) -> None:
        records.append(r)

    spots = {"a": (0.0, 0.0), "b": (100.0, 0.0)}
    async with fleet(config, spots) as agents, watching(config) as (bus, watcher, wire):
        auctioneer = Auctioneer(bus, config.realm, "orchestrator", timing=FAST, on_finished=record)
        await auctioneer.start()
        agents["a"].vehicle.fail()  # type: ignore[attr-defined]
        m = MissionAnnounce(mission="o1", target=Point(x=10, y=0), auctioneer="orchestrator")
        await announce(bus, config.realm, "alice", m)
        async with asyncio.timeout(15):
            await watcher.get("alice", "o1").finished.wait()
        assert [(s, a.winner) for s, a in kinds(wire, "award", "o1")] == [
            ("orchestrator", "a"),
            ("orchestrator", "b"),
        ]
        assert records and records[0].status == "done" and records[0].winners == [["a", "b"]]
        auctioneer.close()


async def test_the_orchestrator_is_the_auctioneer_and_records_the_mission(
    config: Config, tmp_path: Path
) -> None:
    """A mission naming the orchestrator: the realm's orchestrator awards it (its
    account on swarm/award/), and the finished mission is in its history."""
    from daemon.orchestrator.service import Orchestrator
    from tests.conftest import InProcess

    cfg = make_config(
        config.broker.url, config.realm, orchestrator={"state_dir": str(tmp_path / "orch")}
    )
    orch = Orchestrator(cfg)
    runner = InProcess()
    runner._run(orch.run)
    try:
        await asyncio.wait_for(orch._online.wait(), 10)
        spots = {"a": (0.0, 0.0), "b": (100.0, 0.0)}
        async with fleet(config, spots), watching(config) as (bus, watcher, wire):
            m = MissionAnnounce(
                mission="via-orch", target=Point(x=90, y=0), auctioneer="orchestrator"
            )
            await announce(bus, config.realm, "alice", m)
            async with asyncio.timeout(15):
                await watcher.get("alice", "via-orch").finished.wait()
            assert [(s, a.winner) for s, a in kinds(wire, "award", "via-orch")] == [
                ("orchestrator", "b")
            ]
        async with asyncio.timeout(10):
            while not (rows := await orch.store.history(10, capability="swarm.mission")):
                await asyncio.sleep(0.1)
        (row,) = rows
        assert (row["task_id"], row["user"], row["node"], row["outcome"], row["attempts"]) == (
            "mission:alice/via-orch", "alice", "b", "done", 1
        )  # fmt: skip
    finally:
        await runner.close()


async def test_a_workflow_sends_the_nearest_robot_to_a_camera_alarm(
    config: Config, tmp_path: Path
) -> None:
    """docs/swarm.md's example: a camera's person event → the orchestrator's workflow
    publishes a mission → the robots allocate it among themselves."""
    from daemon.orchestrator.service import Orchestrator
    from tests.conftest import InProcess

    flow = {
        "triggers": [{"type": "event", "topic": "+/camera/person"}],
        "steps": [
            {
                "publish": "~/swarm/mission/orchestrator",
                "payload": {
                    "type": "swarm.mission",
                    "mission": "alarm-{{ run.id }}",
                    "task": "inspect",
                    "target": {"x": 35.0, "y": 12.0},
                    "requirements": {"sensors": ["camera"]},
                    "work_s": 0.1,
                },
            }
        ],
    }
    cfg = make_config(
        config.broker.url,
        config.realm,
        orchestrator={"state_dir": str(tmp_path / "orch")},
        workflows={"inspect_alarm": flow},
    )
    runner = InProcess()
    runner._run(Orchestrator(cfg).run)
    try:
        spots = {"near": (30.0, 10.0), "far": (-200.0, 0.0)}
        async with fleet(config, spots), watching(config) as (bus, _watcher, wire):
            await asyncio.sleep(1.0)  # the orchestrator online, its workflow subscribed
            person = topics.EVENT.build(
                realm=config.realm, node_id="porch", domain="camera", name="person"
            )
            await bus.publish(person, Event(value=1))
            async with asyncio.timeout(15):
                while not [m for m in wire.messages if "/swarm/ack/" in m.topic]:
                    await asyncio.sleep(0.05)
            (ack,) = [m for m in wire.messages if "/swarm/ack/" in m.topic]
            assert ack.topic.endswith("/swarm/ack/near")
            mission = decode(ack.payload, MissionAck)
            assert mission.issuer == "orchestrator" and mission.mission.startswith("alarm-")
    finally:
        await runner.close()


async def test_mtor_status_shows_what_each_robot_is_doing(config: Config) -> None:
    async with fleet(config, {"ra": (0.0, 0.0), "rb": (5.0, 0.0)}):
        args = ["status", "--broker", config.broker.url, "--realm", config.realm]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli.main", *args, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=mtor_env(),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        robots = {r["node_id"]: r["robot"] for r in json.loads(out)}
        assert robots["ra"]["status"] == "idle" and robots["ra"]["battery_percent"] == 100
        assert robots["rb"]["pose"] == [5.0, 0.0, 0.0]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.cli.main", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=mtor_env(),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        lines = out.decode().splitlines()
        assert lines[0].split()[-1] == "ROBOT" and lines[1].split()[-2:] == ["idle", "100%"]


async def test_hostile_messages_never_crash_and_forgeries_change_nothing(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    spots = {"r1": (0.0, 0.0), "r2": (50.0, 0.0)}
    async with fleet(config, spots) as agents, watching(config) as (bus, watcher, wire):
        realm = config.realm
        garbage = [
            (topics.SWARM_BID.build(realm=realm, sender="evil"), b"\xff\xfe not json"),
            (topics.SWARM_BID.build(realm=realm, sender="evil"), b"[" * 5000),
            (topics.SWARM_MISSION.build(realm=realm, sender="evil"), b'{"mission": "x"}'),
            (topics.SWARM_ROBOT.build(realm=realm, sender="evil"), b'{"status": "flying"}'),
            (f"mtor/{realm}/swarm/nonsense/evil", b"{}"),
            (topics.SWARM_AWARD.build(realm=realm, sender="evil"), b'{"costs": 1e999}'),
        ]
        for topic, payload in garbage:
            await bus.publish(topic, payload)
        m = MissionAnnounce(mission="h", target=Point(x=45, y=0), bid_window_s=0.5)
        await announce(bus, realm, "alice", m)
        # During the bid window: a forged claim for r1 from 'evil', a forged cheap bid
        # with the wrong number of costs, a 'done' from a robot that holds nothing.
        forged = Award(issuer="alice", mission="h", round=1, winner="r1", cost=0.0)
        await bus.publish(topics.SWARM_AWARD.build(realm=realm, sender="evil"), forged)
        bad_bid = {"type": "swarm.bid", "issuer": "alice", "mission": "h", "costs": [0, 0]}
        await bus.publish(
            topics.SWARM_BID.build(realm=realm, sender="evil"), json.dumps(bad_bid).encode()
        )
        done = MissionProgress(issuer="alice", mission="h", round=1, status="done")
        await bus.publish(topics.SWARM_PROGRESS.build(realm=realm, sender="r1"), done)
        async with asyncio.timeout(10):
            await watcher.get("alice", "h").finished.wait()
        auction = watcher.auction("alice", "h")
        assert auction is not None and auction.sectors[0].winners == ["r2"]
        assert all(a.rejected >= 3 for a in agents.values()), {
            n: a.rejected for n, a in agents.items()
        }
        assert all(t.done() is False for t in asyncio.all_tasks() if "swarm" in t.get_name())
        assert [s for s, _ in kinds(wire, "ack", "h")] == ["r2"]


def test_mtor_sim_swarm_reports_every_position_and_reauctions_the_killed() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "sim", "swarm", "--robots", "6",
         "--missions", "4", "--kill", "2", "--uniform", "--seed", "3", "--json"],
        env=mtor_env(), cwd=ROOT, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    report = json.loads(out.stdout)
    assert len(report["robots"]) == 6 and all(len(r["start"]) == 2 for r in report["robots"])
    assert len(report["killed"]) == 2
    for m in report["missions"]:
        assert m["winner"] not in report["killed"], m
        assert m["reauctioned"] == (m["winners"][0] in report["killed"]), m
        start = next(r["start"] for r in report["robots"] if r["id"] == m["winner"])
        if not m["reauctioned"]:  # --uniform: the cost is the travel distance
            assert m["cost"] == pytest.approx(math.dist(start, m["location"]), abs=1e-3)
    assert any(m["reauctioned"] for m in report["missions"])
    assert report["allocation_s"] < 2.0 and report["reallocation_s"] < 2.0
