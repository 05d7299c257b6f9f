"""docs/protocol.md §8.4 stays true: its `mosquitto_rr` examples and refusal table
run, as written, against a real realm (`home`, node `kitchen`, the reference node)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.broker import PrivateBroker
from daemon.orchestrator.service import Orchestrator
from daemon.runtime import NodeDaemon
from tests.conftest import InProcess, make_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
# Fields that differ on every run: ids, clocks, durations.
VOLATILE = ("task_id", "ts", "queue_ms", "run_ms")
VOLATILE_VALUE = re.compile(r'"(?:%s)":(?:"[^"]*"|[0-9.]+)' % "|".join(VOLATILE))  # noqa: UP031
TASK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _worked_examples() -> str:
    text = DOC.read_text()
    start = text.index("### 8.4 Worked examples")
    return text[start : text.index("\n### ", start + 1)]


def rr_examples() -> list[tuple[str, str]]:
    """(command, the reply line the docs show) of every `$ mosquitto_rr` console example."""
    found = re.findall(r"^\$ (mosquitto_rr [^\n]+)\n(\{[^\n]+\})$", _worked_examples(), re.M)
    assert len(found) >= 2, "docs/protocol.md §8.4 lost its mosquitto_rr examples"
    return found


def refusal_rows() -> list[tuple[str, str]]:
    """(payload, answer fragment) of the refusals table."""
    rows = re.findall(r"^\| `([^`]+)` \| `(.+)` \|$", _worked_examples(), re.M)
    assert len(rows) >= 10, "docs/protocol.md §8.4 lost its refusals table"
    return rows


@pytest.fixture
async def home(own_broker: PrivateBroker, tmp_path: Path) -> AsyncIterator[PrivateBroker]:
    """The realm the docs were captured from: realm `home`, node `kitchen` with `ref`."""
    orch_cfg = {"state_dir": str(tmp_path / "orch")}
    roles = InProcess()
    try:
        orchestrator = Orchestrator(make_config(own_broker.url, "home", orchestrator=orch_cfg))
        roles._run(orchestrator.run)
        await asyncio.wait_for(orchestrator._online.wait(), 10)
        node_cfg = make_config(
            own_broker.url, "home", node_id="kitchen", nodes={"ref": {"type": "reference"}}
        )
        daemon = NodeDaemon(node_cfg)
        roles._run(daemon.run)
        await asyncio.wait_for(daemon._online.wait(), 10)
        async with asyncio.timeout(10):
            while not orchestrator.registry.free.get("sleep"):
                await asyncio.sleep(0.01)
        yield own_broker
    finally:
        await roles.close()


async def rr(broker: PrivateBroker, command: str) -> str:
    """Run a documented mosquitto_rr command against ``broker``; its first reply."""
    args = shlex.split(command)
    args[1:1] = ["-h", broker.host, "-p", str(broker.port), "-W", "10"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, command
    return out.decode().strip()


async def test_mosquitto_rr_examples_answer_as_documented(home: PrivateBroker) -> None:
    for command, shown in rr_examples():
        got = json.loads(await rr(home, command))
        expected = json.loads(shown)
        assert set(got) == set(expected), command
        assert {k: v for k, v in got.items() if k not in VOLATILE} == {
            k: v for k, v in expected.items() if k not in VOLATILE
        }, command
        assert TASK_ID.fullmatch(got["task_id"]), got


async def test_refusals_answer_as_documented(home: PrivateBroker) -> None:
    base = "mosquitto_rr -V 5 -t mtor/home/task/submit -e mtor/home/reply/me/x -m "
    for payload, fragment in refusal_rows():
        got = await rr(home, base + shlex.quote(payload))
        # Volatile values out of the fragment, then each piece between the cuts (…).
        for cut in VOLATILE_VALUE.sub("", fragment).split("…"):
            piece = cut.strip(",")
            assert piece in got, f"{payload}: {piece!r} not in {got}"
