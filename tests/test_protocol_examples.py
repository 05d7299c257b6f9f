"""docs/protocol.md §8.4 stays true: its `mosquitto_rr` examples, its refusal table
and its example of a reply topic outside the requester's space run, as written,
against a real realm (`home`, node `kitchen`, the reference node)."""

from __future__ import annotations

import asyncio
import json
import logging
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


def silent_examples() -> list[str]:
    """Every `$ mosquitto_rr` console example the docs show timing out (no answer)."""
    found = re.findall(r"^\$ (mosquitto_rr [^\n]+)\nTimed out$", _worked_examples(), re.M)
    assert found, "docs/protocol.md §8.4 lost its example of a reply topic that gets no answer"
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


async def run_rr(broker: PrivateBroker, command: str) -> tuple[int, str, str]:
    """Run a documented mosquitto_rr command against ``broker``: (exit code, stdout,
    stderr). Its own ``-W`` stays; without one it waits at most 10 s."""
    args = shlex.split(command)
    args[1:1] = ["-h", broker.host, "-p", str(broker.port)]
    if "-W" not in args:
        args[1:1] = ["-W", "10"]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    return proc.returncode or 0, out.decode().strip(), err.decode().strip()


async def rr(broker: PrivateBroker, command: str) -> str:
    """Run a documented mosquitto_rr command against ``broker``; its first reply."""
    code, out, err = await run_rr(broker, command)
    assert code == 0, f"{command}: {err}"
    return out


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
    base = "mosquitto_rr -V 5 -t mtor/home/task/submit/me -e mtor/home/reply/me/x -m "
    for payload, fragment in refusal_rows():
        got = await rr(home, base + shlex.quote(payload))
        # Volatile values out of the fragment, then each piece between the cuts (…).
        for cut in VOLATILE_VALUE.sub("", fragment).split("…"):
            piece = cut.strip(",")
            assert piece in got, f"{payload}: {piece!r} not in {got}"


async def test_reply_topics_outside_ones_own_space_get_no_answer(
    home: PrivateBroker, caplog: pytest.LogCaptureFixture
) -> None:
    # Silence alone proves nothing (a slow realm is silent too): the orchestrator
    # must also have seen the submission and said why it dropped it.
    caplog.set_level(logging.WARNING, logger="daemon.orchestrator.admission")
    for command in silent_examples():
        args = shlex.split(command)
        account = args[args.index("-t") + 1].rsplit("/", 1)[-1]
        reply_topic = args[args.index("-e") + 1]
        assert not reply_topic.startswith(f"mtor/home/reply/{account}/"), command
        caplog.clear()
        # mosquitto_rr's timeout: exit code 27, "Timed out" on stderr, as the docs show.
        got = await run_rr(home, command)
        assert got == (27, "", "Timed out"), f"{command}: expected a timeout, got {got}"
        dropped = [
            r.getMessage()
            for r in caplog.records
            if r.name == "daemon.orchestrator.admission" and "dropped" in r.getMessage()
        ]
        assert dropped == [
            f"submission from {account} with reply topic {reply_topic!r} "
            f"outside mtor/home/reply/{account}/ dropped"
        ], command
