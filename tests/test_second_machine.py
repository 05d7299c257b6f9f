"""A second machine joins with what it has (issue 15, item 6).

``mtor node --broker URL`` with a config that names no nodes (the shipped
config.yaml) hosts every node type that works on the machine, as ``mtor up``
does; a config that names nodes runs exactly those.  Real processes on a real
Mosquitto: the answer is read from the retained ``node/<id>/info`` and
compared with what the offer probe (:func:`daemon.plugins.offers`) reports in
a process with the same environment, and with what ``mtor up`` advertises.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.messages import decode
from daemon.protocol.node import NodeInfo
from tests.conftest import ROOT, Collector, MtorProcess, make_config, mtor_env, running_bus

pytestmark = pytest.mark.slow

START_TIMEOUT: Final = 150.0  # model files read cold, on a shared machine
PROBE = (
    "import json\n"
    "from daemon.plugins import offers\n"
    "print(json.dumps({k: o.reason if o.entry is None else None for k, o in offers().items()}))\n"
)


def probe(env: dict[str, str]) -> dict[str, str | None]:
    """type -> None (offered here) or the reason it is not, from a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def settled(msg: Any) -> bool:
    """Every hosted node has started (running) or given up (failed)."""
    info = decode(msg.payload, NodeInfo)
    return bool(info.nodes) and all(s.status in ("running", "failed") for s in info.nodes)


def adverts(info: NodeInfo) -> set[tuple[str, str, str]]:
    return {(c.node, c.name, c.backend or "") for c in info.capabilities}


def node_config(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    data = {"daemon": {"state_dir": str(tmp_path / f"{name}-state")}, **data}
    path.write_text(yaml.safe_dump(data))
    return path


async def read_info(broker: PrivateBroker, realm: str, node_id: str) -> NodeInfo:
    async with running_bus(make_config(broker.url, realm)) as bus:
        infos = Collector()
        await bus.subscribe(f"mtor/{realm}/node/{node_id}/info", infos)
        msg = await infos.wait_for(settled, START_TIMEOUT)
    return decode(msg.payload, NodeInfo)


async def test_default_config_offers_what_mtor_up_offers(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    env = mtor_env()
    offered = {t for t, why in probe(env).items() if why is None}
    # The probe offers these on any machine (they need nothing): a node that ran
    # only sensors would fail below.
    assert {"sensors", "reference"} <= offered

    # The shipped config.yaml names no nodes: the second machine starts from it.
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert "nodes" not in shipped
    shipped.pop("daemon", None)
    second_cfg = node_config(tmp_path, "second", shipped)
    up_cfg = node_config(tmp_path, "up", {})
    common = ["--broker", broker.url, "--realm", realm]
    up = MtorProcess(["up", "--config", str(up_cfg), *common, "--node-id", "first"], env)
    processes.append(up)
    node = MtorProcess(["node", "--config", str(second_cfg), *common, "--node-id", "second"], env)
    processes.append(node)

    first, second = await asyncio.gather(
        read_info(broker, realm, "first"), read_info(broker, realm, "second")
    )
    code, out = node.terminate()
    assert code == 0, out
    up.terminate()

    assert {s.type for s in second.nodes} == offered, out
    assert {s.type for s in first.nodes} == offered
    assert adverts(second) == adverts(first), out
    assert "hosting the nodes that work here (the config names none)" in out


async def test_a_config_naming_sensors_runs_only_sensors(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    cfg = node_config(tmp_path, "named", {"nodes": {"sensors": {"type": "sensors"}}})
    args = ["node", "--config", str(cfg), "--broker", broker.url, "--realm", realm]
    node = MtorProcess([*args, "--node-id", "named"])
    processes.append(node)
    info = await read_info(broker, realm, "named")
    code, out = node.terminate()
    assert code == 0, out
    assert [(s.name, s.type) for s in info.nodes] == [("sensors", "sensors")]
    assert {c.node for c in info.capabilities} <= {"sensors"}
    assert "hosting the nodes that work here" not in out


async def test_a_missing_model_is_reported_not_offered(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    # A machine whose models directory says the default chat model comes from a
    # URL and has not been pulled: the model is missing, so chat is not offered
    # (and the log says why); the other types still run.
    models = tmp_path / "models"
    models.mkdir()
    source = {"type": "url", "url": "https://example.invalid/m.gguf"}
    unpulled = {"kind": "gguf", "license": "Apache-2.0", "source": source}
    chat_model = "smollm2-135m-instruct"  # ChatConfig's default backend model
    (models / "manifest.yaml").write_text(yaml.safe_dump({"models": {chat_model: unpulled}}))
    env = mtor_env(MTOR_MODELS_DIR=str(models))
    reasons = probe(env)
    assert reasons["chat"] is not None, reasons
    assert f"model {chat_model} is missing" in reasons["chat"]
    offered = {t for t, why in reasons.items() if why is None}
    cfg = node_config(tmp_path, "bare", {})
    args = ["node", "--config", str(cfg), "--broker", broker.url, "--realm", realm]
    node = MtorProcess([*args, "--node-id", "bare"], env)
    processes.append(node)
    info = await read_info(broker, realm, "bare")
    code, out = node.terminate()
    assert code == 0, out
    assert {s.type for s in info.nodes} == offered, out
    assert "chat" not in {c.name for c in info.capabilities}
    assert f"node type chat not offered here: {reasons['chat']}" in out
