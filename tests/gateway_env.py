"""A realm for the gateway tests: the generated broker (accounts and ACL, as ``mtor up``
makes it), a real orchestrator, a real node daemon and the gateway, in this process.

Every process logs in with its own account, so the gateway's requests go through
the broker ACL of the ``gateway`` role and the orchestrator's identity rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.config import Config, build_config, read_yaml
from daemon.gateway.server import listen, run_gateway
from daemon.orchestrator.service import Orchestrator
from daemon.provision.local import LocalBroker, child_config, prepare
from daemon.runtime import NodeDaemon
from tests.conftest import InProcess


@dataclass
class GatewayRealm:
    url: str
    realm: str
    local: LocalBroker
    broker: PrivateBroker
    sysop_token: str
    configs: dict[str, Config]
    procs: InProcess
    orchestrator: Orchestrator
    base: dict[str, Any]
    daemons: dict[str, NodeDaemon] = field(default_factory=dict)

    async def wait_capabilities(self, names: set[str], timeout: float = 90) -> None:
        """Until online nodes offer every one of ``names`` (watched on the WebSocket: a
        node's advert grows as its models load)."""
        import websockets

        ws_url = self.url.replace("http://", "ws://") + "/api/ws"
        offered: dict[str, set[str]] = {}
        async with asyncio.timeout(timeout), websockets.connect(ws_url) as ws:
            await ws.send(json.dumps({"token": self.sysop_token}))
            while True:
                msg = json.loads(await ws.recv())
                nodes = msg["data"]["nodes"] if msg["kind"] == "snapshot" else [msg["data"]]
                for n in nodes if msg["kind"] in ("snapshot", "node") else []:
                    caps = {c["name"] for c in n["capabilities"]} if n["online"] else set()
                    offered[n["node_id"]] = caps
                if names <= set().union(*offered.values()):
                    return

    @contextlib.asynccontextmanager
    async def account_bus(self, name: str, role: str = "node") -> AsyncIterator[Bus]:
        """A connected bus logged in as a new broker account ``name`` of ``role``."""
        if self.local.dir.accounts().get(name) is None:
            self.local.dir.add(name, role, local=True)  # type: ignore[arg-type]
            self.local.dir.reload()
            await self._until_accepted(name)
        cfg = _load(child_config(self.local, name, self.base, name))
        bus = Bus(cfg.broker, f"test-{name}", password=cfg.broker_password())
        task = asyncio.create_task(bus.run())
        try:
            await bus.wait_connected(10)
            yield bus
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _until_accepted(self, account: str, timeout: float = 10) -> None:
        """Until the broker takes the account's new password (a refused login is fatal
        to a daemon, so it must not try before)."""
        from daemon.mqtt import ConnectParams, MqttError, connect

        params = ConnectParams(
            "127.0.0.1",
            self.local.port,
            f"probe-{account}",
            username=account,
            password=self.local.dir.password(account),
        )
        async with asyncio.timeout(timeout):
            while True:
                try:
                    conn = await connect(params)
                except MqttError:
                    await asyncio.sleep(0.05)  # the broker handles SIGHUP on its own time
                    continue
                await conn.close()
                return

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.sysop_token}"}

    async def add_node(self, node_id: str, nodes: dict[str, Any], wait: float = 30) -> NodeDaemon:
        """A node daemon with its own node account (made in the broker directory)."""
        if self.local.dir.accounts().get(node_id) is None:
            self.local.dir.add(node_id, "node", local=True)
            self.local.dir.reload()  # SIGHUP: the broker rereads passwd and acl
            await self._until_accepted(node_id)
        cfg = _load(child_config(self.local, node_id, {**self.base, "nodes": nodes}, node_id))
        daemon = NodeDaemon(cfg)
        self.procs._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), wait)
        self.daemons[node_id] = daemon
        return daemon


def png(width: int = 64, height: int = 48, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A small solid-colour PNG (a stand-in camera picture; standard library only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _load(path: Path) -> Config:
    return build_config(read_yaml(path))


@contextlib.asynccontextmanager
async def gateway_realm(
    tmp: Path, realm: str, nodes: dict[str, Any] | None = None, **gateway: Any
) -> AsyncIterator[GatewayRealm]:
    """The realm with a node ``box`` hosting ``nodes`` (default: the reference node)."""
    base: dict[str, Any] = {
        "realm": realm,
        "daemon": {"state_dir": str(tmp / "state")},
        "orchestrator": {"state_dir": str(tmp / "orch"), "stats_interval": 1.0},
        "gateway": {"port": 1, **gateway},
    }
    seed = build_config({**base, "node_id": "box", "nodes": {}})
    local = await asyncio.to_thread(prepare, seed)
    broker = PrivateBroker.generated(local.dir.conf_file, local.port)
    await asyncio.to_thread(broker.start)
    procs = InProcess()
    try:
        orch_cfg = _load(child_config(local, "orchestrator", base, "orchestrator"))
        orch = Orchestrator(orch_cfg)
        procs._run(orch.run)
        await asyncio.wait_for(orch._online.wait(), 15)
        token_file = tmp / "orch" / "sysop.token"
        async with asyncio.timeout(10):
            while not token_file.is_file():
                await asyncio.sleep(0.05)
        gw_cfg = _load(child_config(local, "gateway", base, "gateway"))
        sock: socket.socket = listen("127.0.0.1", 0)
        started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def gateway_runner(stop: asyncio.Event) -> None:
            await run_gateway(gw_cfg, stop, sock=sock, ready=started.set_result)

        procs._run(gateway_runner)
        url = await asyncio.wait_for(started, 10)
        env = GatewayRealm(
            url=url,
            realm=realm,
            local=local,
            broker=broker,
            sysop_token=token_file.read_text().strip(),
            configs={"orchestrator": orch_cfg, "gateway": gw_cfg},
            procs=procs,
            orchestrator=orch,
            base=base,
        )
        await env.add_node("box", nodes if nodes is not None else {"ref": {"type": "reference"}})
        yield env
    finally:
        await procs.close()
        await asyncio.to_thread(broker.cleanup)
