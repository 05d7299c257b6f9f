"""``mtor up``, the README's first command, end to end: a private broker (generated
accounts and ACL), the orchestrator and a node daemon with every node that works
on this machine — then tasks of each kind through the realm, and a clean stop."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import cv2
import pytest
from skimage import data as skdata

from daemon import topics
from daemon.broker import free_port, port_open
from daemon.client import RealmClient
from daemon.messages import decode
from daemon.protocol.node import NodeInfo
from daemon.provision.brokerdir import BrokerDir
from tests.conftest import Collector, MtorProcess, make_config, running_bus, write_config

pytestmark = pytest.mark.slow

# What a machine set up by install.sh (chat, voice and vision extras, their models) offers.
EXPECTED = {"echo", "sleep", "chat", "stt", "tts", "vision.detect", "vision.faces"}


def jpeg_b64(image_rgb: Any) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


async def test_mtor_up_runs_a_working_realm(tmp_path: Path, processes: list[MtorProcess]) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    path = write_config(
        tmp_path,
        {
            "realm": "up",
            "node_id": "box",
            "broker": {"url": url},
            "daemon": {"state_dir": str(tmp_path / "state")},
            "orchestrator": {"state_dir": str(tmp_path / "orch")},
        },
    )
    up = MtorProcess(["up", "--config", str(path)])
    processes.append(up)
    async with asyncio.timeout(30):
        while not port_open("127.0.0.1", port):  # the private broker of `mtor up`
            assert up.proc.poll() is None, up.output()
            await asyncio.sleep(0.1)

    # a broker named in the config that nobody runs: mtor up starts its generated,
    # authenticated one there; this test logs in as its sysop account
    admin = BrokerDir(tmp_path / "state" / "broker")
    broker = {"url": url, "username": "admin", "password": admin.password("admin")}
    config = make_config(url, "up", broker=broker)
    async with running_bus(config) as bus:
        infos = Collector()
        await bus.subscribe(topics.NODE_INFO.build(realm="up", node_id="box"), infos)

        def offers_all(m: Any) -> bool:
            names = {c.name for c in decode(m.payload, NodeInfo).capabilities}
            return names >= EXPECTED

        await infos.wait_for(offers_all, timeout=120)  # models load in the node's setup
        client = RealmClient(bus, "up", user="tester")
        await client.start()
        assert await client.call("echo", {"hi": 1}, timeout=20) == {"hi": 1}
        faces = await client.call(
            "vision.faces", {"image": jpeg_b64(skdata.astronaut())}, timeout=60
        )
        assert len(faces["faces"]) == 1, faces
        spoken = await client.call("tts", {"text": "The realm is up."}, timeout=60)
        assert spoken["bytes"] > 16000, spoken  # more than half a second of 16 kHz audio
        answer = await client.call("chat", {"prompt": "Say hello."}, timeout=120)
        assert answer["text"].strip(), answer

    rc, out = up.terminate(timeout=30)
    assert rc == 0, out
    # the ready line: once the orchestrator is online and every node has started
    (ready,) = [line for line in out.splitlines() if line.startswith("mtor up: ready in ")]
    assert f"on mqtt://127.0.0.1:{port}: orchestrator online; node 'box' runs " in ready, ready
    assert all(cap in ready for cap in EXPECTED), ready
    assert not port_open("127.0.0.1", port)  # the private broker is gone too
