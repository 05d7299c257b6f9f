"""``mtor status`` and ``mtor events``: what the realm looks like and says."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from typing import Any

from daemon import topics
from daemon.accounts import ANONYMOUS, account_name
from daemon.bus import Inbound
from daemon.cli import tables
from daemon.cli.common import api_token, client_bus, environ
from daemon.config import Config
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.admin import OrchestratorState
from daemon.protocol.node import Event, NodeHealth, NodeInfo, NodeState
from daemon.protocol.swarm import RobotState

# Retained messages arrive right after the SUBACK; a sentinel message published
# after subscribing comes back behind them, so its arrival means "all seen".
SENTINEL_TIMEOUT = 3.0
# How long `mtor status` waits for the orchestrator's view of the peers (s).
PEERS_TIMEOUT = 2.0


async def collect_nodes(config: Config) -> dict[str, dict[str, Any]]:
    """The retained state/info/health of every node in the realm."""
    nodes: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()

    async def on_node(msg: Inbound) -> None:
        for pattern, cls, key in (
            (topics.NODE_STATE, NodeState, "state"),
            (topics.NODE_INFO, NodeInfo, "info"),
            (topics.NODE_HEALTH, NodeHealth, "health"),
        ):
            fields = pattern.parse(msg.topic)
            if fields is None or not msg.payload:
                continue
            try:
                nodes.setdefault(fields["node_id"], {})[key] = decode(msg.payload, cls)
            except MessageError as exc:
                nodes.setdefault(fields["node_id"], {})[f"{key}_error"] = str(exc)

    async def on_sentinel(_msg: Inbound) -> None:
        done.set()

    orchestrator: list[str] = []

    async def on_robot(msg: Inbound) -> None:
        fields = topics.SWARM_ROBOT.parse(msg.topic)
        if fields is not None and msg.payload:
            with contextlib.suppress(MessageError):
                nodes.setdefault(fields["sender"], {})["robot"] = decode(msg.payload, RobotState)

    async def on_orchestrator(msg: Inbound) -> None:
        with contextlib.suppress(MessageError):
            orchestrator.append(decode(msg.payload, OrchestratorState).state)

    async with client_bus(config) as bus:
        # The account client_bus logged in as (mtor up's private broker: admin).
        me = account_name(bus.config.username, environ().get("MTOR_USER") or ANONYMOUS)
        sentinel = topics.CLI_SENTINEL.build(realm=config.realm, user=me, token=uuid.uuid4().hex)
        await bus.subscribe(topics.NODE_ANY.filter(realm=config.realm), on_node)
        await bus.subscribe(topics.ORCH_STATE.build(realm=config.realm), on_orchestrator)
        await bus.subscribe(topics.SWARM_ROBOT.filter(realm=config.realm), on_robot)
        await bus.subscribe(sentinel, on_sentinel)
        await bus.publish(sentinel, b"", qos=1)
        async with asyncio.timeout(SENTINEL_TIMEOUT):
            await done.wait()
        if orchestrator[-1:] == ["online"]:  # its view: drained, blacklisted
            for node_id, peer in (await _peer_flags(config, bus)).items():
                if node_id in nodes:
                    nodes[node_id]["peer"] = peer
    return nodes


async def _peer_flags(config: Config, bus: Any) -> dict[str, dict[str, Any]]:
    """The orchestrator's view of each peer (drained, blacklisted), when it answers
    in time: {} without an orchestrator, or when it refuses this identity."""
    from daemon.client import RealmClient
    from daemon.errors import MtorError

    token = api_token(config)
    client = RealmClient(bus, config.realm, user=environ().get("MTOR_USER"), token=token)
    try:
        await client.start()
        peers = await client.admin("peers", timeout=PEERS_TIMEOUT)
    except (MtorError, TimeoutError):
        return {}
    return peers if isinstance(peers, dict) else {}


def status_rows(nodes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for node_id in sorted(nodes):
        entry = nodes[node_id]
        state: NodeState | None = entry.get("state")
        info: NodeInfo | None = entry.get("info")
        health: NodeHealth | None = entry.get("health")
        stale_info = info is not None and state is not None and info.boot_id != state.boot_id
        peer = entry.get("peer") or {}
        robot: RobotState | None = entry.get("robot")
        rows.append(
            {
                "node_id": node_id,
                "state": state.state if state else "unknown",
                "since": state.ts if state else None,
                "version": state.version if state else None,
                "capabilities": sorted({c.name for c in info.capabilities})
                if info and not stale_info
                else [],
                "nodes": [f"{n.name}:{n.status}" for n in info.nodes] if info else [],
                # Why a node failed, or runs without a backend (the crash guard's word).
                "errors": {n.name: n.error for n in info.nodes if n.error} if info else {},
                "restarts": sum(n.restarts for n in info.nodes) if info else None,
                "drained": peer.get("drained"),
                "blacklisted": peer.get("blacklisted"),
                "cpu_percent": health.cpu_percent if health else None,
                "load1": health.load[0] if health and health.load else None,
                "mem_percent": health.mem_percent if health else None,
                "temperature_c": health.temperature_c if health else None,
                "active_tasks": health.active_tasks if health else None,
                "area": info.area if info else None,
                "robot": {
                    "status": robot.status,
                    "battery_percent": robot.battery_percent,
                    "pose": [robot.pose.x, robot.pose.y, robot.pose.z],
                    "mission": robot.mission.mission if robot.mission else None,
                }
                if robot
                else None,
            }
        )
    return rows


def print_status(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not rows:
        print("no nodes in this realm yet")
        return
    header = (
        "NODE", "STATE", "LOAD", "CPU%", "MEM%", "TEMP", "TASKS", "RESTARTS", "CAPABILITIES"
    )  # fmt: skip
    table = [
        (
            r["node_id"],
            ",".join([r["state"], *(f for f in ("drained", "blacklisted") if r[f])]),
            _num(r["load1"]),
            _num(r["cpu_percent"]),
            _num(r["mem_percent"]),
            _num(r["temperature_c"]),
            _num(r["active_tasks"]),
            _num(r["restarts"]),
            ",".join(r["capabilities"]) or "-",
        )
        for r in rows
    ]
    if any(r["robot"] for r in rows):  # a swarm: what each robot is doing
        robots = [(*t, _robot(r["robot"])) for t, r in zip(table, rows, strict=True)]
        print(tables.table((*header, "ROBOT"), robots))
    else:
        print(tables.table(header, table))
    notes = [(r["node_id"], n, e) for r in rows for n, e in sorted(r["errors"].items())]
    if notes:
        print()
        for node_id, name, error in notes:
            print(f"{node_id}/{name}: {error[:300]}")


def _robot(robot: dict[str, Any] | None) -> str:
    if robot is None:
        return "-"
    mission = f" {robot['mission']}" if robot["mission"] else ""
    return f"{robot['status']}{mission} {robot['battery_percent']:.0f}%"


def _num(v: float | int | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def events_filter(realm: str, spec: str | None) -> str:
    """``None`` → all events; ``NODE`` → that node's; ``a/b/#`` → under event/;
    a full ``mtor/...`` filter is used as given."""
    base = topics.EVENT_ROOT.build(realm=realm)
    if not spec:
        return base + "/#"
    if spec.startswith(topics.ROOT + "/"):
        return topics.validate_filter(spec)
    if "/" not in spec and spec not in ("#", "+"):
        return f"{base}/{spec}/#"
    return topics.validate_filter(f"{base}/{spec}")


def format_event(node_id: str, domain: str, name: str, event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    value = "" if event.value is None else f" = {event.value}"
    unit = f" {event.unit}" if event.unit and event.value is not None else ""
    attrs = f"  {json.dumps(event.attrs, separators=(',', ':'))}" if event.attrs else ""
    return f"{stamp} {node_id} {domain}/{name}{value}{unit}{attrs}"


async def tail_events(
    config: Config, spec: str | None, *, as_json: bool, count: int | None, timeout: float | None
) -> int:
    """Print events until interrupted, ``count`` events, or ``timeout`` seconds."""
    seen = 0
    finished = asyncio.Event()

    async def on_event(msg: Inbound) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return  # more may be dispatched before the bus stops: print exactly `count`
        fields = topics.EVENT.parse(msg.topic)
        try:
            event = decode(msg.payload, Event)
        except MessageError as exc:
            print(f"(malformed event on {msg.topic}: {exc})", file=sys.stderr)
            return
        if as_json:
            doc = {"topic": msg.topic, **(fields or {}), **event.model_dump(exclude_none=True)}
            print(json.dumps(doc, separators=(",", ":")), flush=True)
        elif fields is not None:
            line = format_event(fields["node_id"], fields["domain"], fields["name"], event)
            print(line, flush=True)
        else:
            print(f"{msg.topic} {msg.preview()}", flush=True)
        seen += 1
        if count is not None and seen >= count:
            finished.set()

    async with client_bus(config) as bus:
        await bus.subscribe(events_filter(config.realm, spec), on_event)
        try:
            async with asyncio.timeout(timeout):
                await finished.wait()
        except TimeoutError:
            pass
    return seen
