"""The node daemon as users run it: real `mtor node` processes on a real broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from daemon.broker import PrivateBroker
from daemon.config import Config
from daemon.messages import decode
from daemon.protocol.node import NodeHealth, NodeInfo, NodeState
from daemon.runtime import NodeDaemon
from tests.conftest import ROOT, Collector, MtorProcess, make_config, mtor_env, running_bus


def state_of(m: object) -> NodeState:
    return decode(m.payload, NodeState)  # type: ignore[attr-defined]


def node_args(broker_url: str, realm: str, node_id: str, tmp_path: Path) -> list[str]:
    cfg = tmp_path / f"{node_id}.yaml"
    cfg.write_text("nodes: {}\ndaemon: {health_interval: 0.5}\n")
    return [
        "node",
        "--config",
        str(cfg),
        "--broker",
        broker_url,
        "--realm",
        realm,
        "--node-id",
        node_id,
    ]


async def test_will_after_kill9_and_birth(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        states = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n1/state", states)
        proc = MtorProcess(node_args(broker.url, realm, "n1", tmp_path))
        processes.append(proc)
        online = await states.wait_for(lambda m: state_of(m).state == "online", timeout=10)
        assert online.retain is False or online.retain is True
        boot = state_of(online).boot_id
        proc.kill9()
        # The broker sends the will when it notices the dead socket (immediately on RST).
        offline = await states.wait_for(lambda m: state_of(m).state == "offline", timeout=10)
        assert state_of(offline).boot_id == boot
    # Retained: a newcomer sees the node offline.
    async with running_bus(cfg) as bus:
        late = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n1/state", late)
        m = await late.wait_for(lambda m: True, timeout=5)
        assert m.retain
        assert state_of(m).state == "offline"


async def test_sigterm_graceful_offline_within_budget(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        states = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n2/state", states)
        proc = MtorProcess(node_args(broker.url, realm, "n2", tmp_path))
        processes.append(proc)
        await states.wait_for(lambda m: state_of(m).state == "online", timeout=10)
        t0 = time.monotonic()
        code, out = await asyncio.to_thread(proc.terminate, 10)
        elapsed = time.monotonic() - t0
        assert code == 0, out
        assert elapsed < 5.0
        offline = await states.wait_for(lambda m: state_of(m).state == "offline", timeout=5)
        assert state_of(offline).reason == "shutdown"


async def test_node_survives_malformed_payloads_on_every_topic(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        states = Collector()
        infos = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n3/state", states)
        await bus.subscribe(f"mtor/{realm}/node/n3/info", infos)
        proc = MtorProcess(node_args(broker.url, realm, "n3", tmp_path))
        processes.append(proc)
        await states.wait_for(lambda m: state_of(m).state == "online", timeout=10)
        garbage = [
            b"",
            b"\xff\xfe",
            b"{",
            b"[]",
            b'{"type":"node.command","v":99}',
            b'{"node":5}',
            b"x" * 2_000_000,
            b'{"node":"nope"}',
        ]
        for cmd in ("restart", "announce", "bogus"):
            for g in garbage:
                await bus.publish(f"mtor/{realm}/node/n3/cmd/{cmd}", g)
        before = len(infos.messages)
        await bus.publish(f"mtor/{realm}/node/n3/cmd/announce", b"{}")
        await infos.wait_count(before + 1, timeout=10)
        assert proc.proc.poll() is None
    code, out = await asyncio.to_thread(proc.terminate, 10)
    assert code == 0
    assert "bad command" in out
    assert "Traceback" not in out


async def test_reconnect_reannounces(own_broker: PrivateBroker, realm: str) -> None:
    cfg = make_config(own_broker.url, realm, node_id="n4", daemon={"health_interval": 60})
    daemon = NodeDaemon(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon._online.wait(), 10)
        t0 = time.monotonic()
        await asyncio.to_thread(own_broker.restart)
        async with running_bus(cfg) as bus:
            states, infos = Collector(), Collector()
            await bus.subscribe(f"mtor/{realm}/node/n4/state", states)
            await bus.subscribe(f"mtor/{realm}/node/n4/info", infos)
            await states.wait_for(lambda m: state_of(m).state == "online", timeout=10)
            info = decode((await infos.wait_for(lambda m: True, timeout=5)).payload, NodeInfo)
            assert info.boot_id == daemon.boot_id
        assert time.monotonic() - t0 < 10
        assert daemon.bus.connects == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_health_is_published(broker: PrivateBroker, realm: str) -> None:
    cfg = make_config(broker.url, realm, node_id="n5", daemon={"health_interval": 0.2})
    stop = asyncio.Event()
    daemon = NodeDaemon(cfg)
    async with running_bus(cfg) as bus:
        health = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n5/health", health)
        task = asyncio.create_task(daemon.run(stop))
        try:
            await health.wait_count(3, timeout=10)
            h = decode(health.messages[-1].payload, NodeHealth)
            assert h.boot_id == daemon.boot_id
            assert h.rss_mb is not None and h.rss_mb > 0
            assert h.cpu_percent is not None
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def test_auth_refused_exits_77(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "u", "p"], check=True)
    with PrivateBroker(extra_config=f"allow_anonymous false\npassword_file {pw}\n") as b:
        env = mtor_env(MTOR_BROKER_USERNAME="u", MTOR_BROKER_PASSWORD="wrong-secret")
        cfg = tmp_path / "c.yaml"
        cfg.write_text("nodes: {}\n")
        r = subprocess.run(
            [sys.executable, "-m", "daemon.cli.main", "node", "-c", str(cfg), "-b", b.url],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert r.returncode == 77, r.stderr
    assert "refused" in r.stderr
    assert "wrong-secret" not in r.stderr + r.stdout


def test_config_error_exits_78(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "realm: home\nbroker:\n  url: http://x\nnodes:\n  s:\n    type: sensors\n"
        "    interval: -1\n    colour: red\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "node", "-c", str(cfg)],
        env=mtor_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 78
    assert "broker.url" in r.stderr
    assert "nodes.s.interval" in r.stderr
    assert "nodes.s.colour: unknown key" in r.stderr


async def test_status_cli_lists_nodes(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg: Config = make_config(broker.url, realm)
    async with running_bus(cfg) as bus:
        states = Collector()
        await bus.subscribe(f"mtor/{realm}/node/n6/state", states)
        processes.append(MtorProcess(node_args(broker.url, realm, "n6", tmp_path)))
        await states.wait_for(lambda m: state_of(m).state == "online", timeout=10)
    r = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "daemon.cli.main",
            "status",
            "--json",
            "-b",
            broker.url,
            "-r",
            realm,
        ],
        env=mtor_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    import json

    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["node_id"] for row in rows] == ["n6"]
    assert rows[0]["state"] == "online"
