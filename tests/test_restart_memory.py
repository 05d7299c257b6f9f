"""``node/<id>/cmd/restart`` on a real `mtor node --auto-nodes`: the models of the
old nodes are freed before the new ones load, so RSS does not grow per restart.

Before the fix each restart loaded every model again beside the old ones
(about 95 MB RSS and three duplicate capability adverts per restart here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from daemon.broker import PrivateBroker
from daemon.messages import decode
from daemon.protocol.node import NodeInfo
from tests.conftest import Collector, MtorProcess, make_config, running_bus

pytestmark = pytest.mark.slow

RESTARTS: Final = 10
# RSS after the last restart may exceed RSS after the first by this much.
GROWTH_LIMIT: Final = 1.10
# Node types whose setup loads a model (reference and sensors load none).
MODEL_TYPES: Final = {"chat", "vision", "voice"}
START_TIMEOUT: Final = 120.0  # first start: model files are read cold
RESTART_TIMEOUT: Final = 60.0


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def settled(restarts: int) -> Callable[[object], bool]:
    """An info where every node has been (re)started ``restarts`` times and is
    up again (running, or failed as it did at start)."""

    def check(msg: object) -> bool:
        info = decode(msg.payload, NodeInfo)  # type: ignore[attr-defined]
        return bool(info.nodes) and all(
            s.restarts >= restarts and s.status in ("running", "failed") for s in info.nodes
        )

    return check


async def test_restarts_free_the_old_models(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text("nodes: {}\n")
    args = ["node", "--auto-nodes", "--config", str(cfg_file), "--broker", broker.url]
    proc = MtorProcess([*args, "--realm", realm, "--node-id", "rm"])
    processes.append(proc)
    pid = proc.proc.pid
    cmd = f"mtor/{realm}/node/rm/cmd/restart"
    async with running_bus(make_config(broker.url, realm)) as bus:
        infos = Collector()
        await bus.subscribe(f"mtor/{realm}/node/rm/info", infos)
        first = decode((await infos.wait_for(settled(0), START_TIMEOUT)).payload, NodeInfo)
        running = {s.name for s in first.nodes if s.status == "running"}
        with_models = {s.name for s in first.nodes if s.type in MODEL_TYPES} & running
        if not with_models:
            pytest.skip(f"no model-bearing node runs here: {[s.model_dump() for s in first.nodes]}")
        adverts = sorted((c.node, c.name, c.backend or "") for c in first.capabilities)

        rss: dict[int, int] = {}
        for k in range(1, RESTARTS + 1):
            infos.messages.clear()
            await bus.publish(cmd, b"{}", qos=1)
            info = decode((await infos.wait_for(settled(k), RESTART_TIMEOUT)).payload, NodeInfo)
            rss[k] = vm_rss_kib(pid)
            assert {s.name for s in info.nodes if s.status == "running"} == running
            # A restart must not add a second copy of a backend to the advert.
            assert sorted((c.node, c.name, c.backend or "") for c in info.capabilities) == adverts

    code, out = await asyncio.to_thread(proc.terminate, 20)
    series = ", ".join(f"{k}: {v / 1024:.0f}" for k, v in rss.items())
    assert rss[RESTARTS] <= GROWTH_LIMIT * rss[1], (
        f"RSS (MiB) after each restart of {sorted(with_models)}: {series}"
    )
    assert code == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
