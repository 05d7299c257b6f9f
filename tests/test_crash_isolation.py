"""Crash isolation for native backends (issue 21, item 1): a backend that segfaults
on import, on load or mid-task costs its own node, never the daemon's others.

The backends are ``tests.crashy_backends`` (each kills its process with SIGSEGV at
one moment) behind the test-only ``crashy`` node type, run in a real ``mtor node``
(``python -m tests.crashy.main``: mtor with that type registered) beside a
reference and a sensors node, with a real orchestrator.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.client import RealmClient, TaskFailed
from daemon.config import build_config
from daemon.messages import decode
from daemon.probe import MAX_IDENTICAL_CRASHES, BackendGuard, Target
from daemon.probe_fault import BLOCKER, Blocker, culprit, parse_fault, relevant_stack
from daemon.protocol.node import NodeInfo
from daemon.supervisor import Supervised, supervise
from tests.conftest import ROOT, Collector, MtorProcess, make_config, mtor_env, running_bus

NODE = "edge"


class CrashyProcess(MtorProcess):
    """``mtor`` with the ``crashy`` node type known (tests.crashy.main)."""

    def __init__(self, args: list[str]) -> None:
        import collections
        import threading

        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crashy.main", *args],
            env=mtor_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._lines = collections.deque(maxlen=self.KEEP_LINES)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def write(tmp: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def node_config(tmp: Path, realm: str) -> Path:
    crashy = {"type": "crashy"}
    return write(
        tmp,
        "node",
        {
            "realm": realm,
            "daemon": {"state_dir": str(tmp / "state"), "restart_initial_delay": 0.2},
            "nodes": {
                "ref": {"type": "reference"},
                "sensors": {"type": "sensors", "builtin": ["load"], "interval": 5},
                "imp": {**crashy, "crash": "import", "capability": "c_import"},
                "lod": {**crashy, "crash": "load", "capability": "c_load"},
                "nofb": {**crashy, "crash": "load", "capability": "c_nofb", "fallback": False},
                "tsk": {**crashy, "crash": "task", "capability": "c_task"},
                "ok": {**crashy, "capability": "c_ok"},
            },
        },
    )


def orchestrator(broker: PrivateBroker, realm: str, tmp: Path) -> MtorProcess:
    cfg = write(
        tmp,
        "orch",
        {
            "realm": realm,
            "nodes": {},
            "orchestrator": {"state_dir": str(tmp / "orch"), "ack_timeout": 2.0},
        },
    )
    return MtorProcess(["orchestrator", "-c", str(cfg), "-b", broker.url])


def start_node(cfg: Path, broker: PrivateBroker) -> CrashyProcess:
    return CrashyProcess(["node", "-c", str(cfg), "-b", broker.url, "-n", NODE])


def settled(info: NodeInfo) -> bool:
    return all(n.status in ("running", "failed") for n in info.nodes)


async def wait_info(infos: Collector, pred: Any, timeout: float = 60.0) -> NodeInfo:
    msg = await infos.wait_for(lambda m: pred(decode(m.payload, NodeInfo)), timeout)
    return decode(msg.payload, NodeInfo)


async def test_segfaults_on_import_load_and_task_cost_only_their_node(
    broker: PrivateBroker, realm: str, tmp_path: Path, processes: list[MtorProcess]
) -> None:
    processes.append(orchestrator(broker, realm, tmp_path))
    cfg = node_config(tmp_path, realm)
    node = start_node(cfg, broker)
    processes.append(node)
    async with running_bus(make_config(broker.url, realm)) as bus:
        infos = Collector()
        await bus.subscribe(f"mtor/{realm}/node/{NODE}/info", infos)
        client = RealmClient(bus, realm, user="t")
        await client.start()
        info = await wait_info(infos, lambda i: len(i.nodes) == 7 and settled(i))
        nodes = {n.name: n for n in info.nodes}
        caps = {c.name: c for c in info.capabilities}
        # Import and load crashes: the node runs on with its pure-Python backend,
        # and says what it runs without and why.
        for name, module in (("imp", "on_import"), ("lod", "on_load")):
            assert nodes[name].status == "running", node.output()[-6000:]
            error = nodes[name].error or ""
            assert "SIGSEGV" in error and f"tests.crashy_backends.{module}" in error, error
        assert "setup" in (nodes["lod"].error or "")
        assert caps["c_import"].backend == caps["c_load"].backend == "python"
        # Without a fallback the node is out, with the signal and the step it reached.
        assert nodes["nofb"].status == "failed"
        assert "SIGSEGV" in (nodes["nofb"].error or "")
        assert "c_nofb" not in caps
        assert caps["c_task"].backend == caps["c_ok"].backend == "native"
        assert nodes["ref"].status == nodes["sensors"].status == "running"
        assert await client.call("echo", "still here", timeout=10) == "still here"
        assert (await client.call("c_import", 1, timeout=10))["backend"] == "python"
        assert node.proc.poll() is None
        # ... and mtor status says so, under its table.
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "daemon.cli.main", "status", "--broker", broker.url,
             "--realm", realm],
            capture_output=True, text=True, timeout=60, env=mtor_env(), check=False,
        )  # fmt: skip
        notes = [line for line in status.stdout.splitlines() if line.startswith(f"{NODE}/")]
        assert any(n.startswith(f"{NODE}/imp: ") and "SIGSEGV" in n for n in notes), status.stdout
        assert any(n.startswith(f"{NODE}/nofb: ") for n in notes), status.stdout
        first = node.output()
        assert "loading node lod (crashy)" in first
        assert "probing" in first

        # Mid-task: the daemon dies (only a process boundary could save it), and the
        # next start blames the backend on the crashed stack and keeps it out.
        pending = asyncio.create_task(client.call("c_task", 2, timeout=60))
        await asyncio.to_thread(node.proc.wait, 30)
        assert node.proc.returncode == -11, node.output()[-3000:]
        infos.messages.clear()
        again = start_node(cfg, broker)
        processes.append(again)
        info = await wait_info(
            infos, lambda i: i.boot_id != "" and len(i.nodes) == 7 and settled(i)
        )
        nodes = {n.name: n for n in info.nodes}
        caps = {c.name: c for c in info.capabilities}
        error = nodes["tsk"].error or ""
        assert "SIGSEGV" in error and "tests.crashy_backends.on_task" in error, error
        assert "infer" in error, error
        assert caps["c_task"].backend == "python"
        assert nodes["ref"].status == "running"
        assert await client.call("echo", "back", timeout=10) == "back"
        # The task was handed to the daemon again once it came back: the fallback did it.
        try:
            result = await asyncio.wait_for(pending, 30)
            assert result["backend"] == "python"
        except TaskFailed:
            pass  # an orchestrator that gave the task up is fine too
        second = again.output()
        assert "probing" not in second  # the verdicts are kept
        assert "crashed the last run" in second


def fault_text(tmp: Path, code: str) -> str:
    """What faulthandler writes when ``code`` kills a real interpreter."""
    log = tmp / "fault.log"
    script = (
        "import faulthandler, sys\n"
        f"f = open({str(log)!r}, 'w')\n"
        "faulthandler.enable(file=f, all_threads=True)\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n" + code
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=30, check=False)
    assert proc.returncode == -11
    return log.read_text()


def test_a_segfault_in_a_thread_is_blamed_on_its_module(tmp_path: Path) -> None:
    text = fault_text(
        tmp_path,
        "import threading, tests.crashy_backends.on_task as b\n"
        "t = threading.Thread(target=b.infer, args=(1,)); t.start(); t.join()\n",
    )
    fault = parse_fault(text)
    assert fault is not None and fault.signal == "SIGSEGV"
    blamed, frame = culprit(relevant_stack(fault), ["tests.crashy", "daemon"], [str(ROOT)])
    assert blamed == "tests.crashy_backends.on_task"
    assert frame is not None and frame.func == "infer"
    # The node's own code is never what gets blocked.
    blamed, frame = culprit(relevant_stack(fault), ["tests.crashy_backends"], [str(ROOT)])
    assert blamed is None and frame is not None


def test_blocked_module_fails_soft_as_a_missing_one() -> None:
    blocker = Blocker()
    blocker.block("tests.crashy_backends.on_import", "it crashed")
    sys.meta_path.insert(0, blocker)
    try:
        with pytest.raises(ImportError, match="it crashed"):
            import tests.crashy_backends.on_import  # noqa: F401
    finally:
        sys.meta_path.remove(blocker)
    assert BLOCKER is not blocker


def test_identical_crashes_in_the_nodes_own_code_back_off_then_stop(tmp_path: Path) -> None:
    """A crash with no backend to blame (a native call straight from node code):
    the node waits longer each run and is not started after MAX_IDENTICAL_CRASHES."""
    # The guard reads only the state dir of the config; the node is the target.
    config = build_config({"daemon": {"state_dir": str(tmp_path)}})
    target = Target("c", "tests.crashy.node:CrashyNode", {"type": "crashy"})
    node_file = ROOT / "tests" / "crashy" / "node.py"
    fault = (
        "Fatal Python error: Segmentation fault\n\n"
        "Current thread 0x00007f0000000001 (most recent call first):\n"
        f'  File "{node_file}", line 40 in execute\n'
        '  File "/usr/lib/python3.11/threading.py", line 975 in run\n\n'
    )
    delays = []
    for run in range(MAX_IDENTICAL_CRASHES):
        guard = BackendGuard(config, "n", [target])
        if run:
            guard.fault_path.write_text(fault)
        guard.open()
        guard.close()
        delays.append(guard.start_delay("c", 1.0, 60.0))
        assert not guard.verdict("c").unavailable or run == MAX_IDENTICAL_CRASHES - 1
    assert delays[1:] == [1.0, 2.0][: MAX_IDENTICAL_CRASHES - 1]
    guard = BackendGuard(config, "n", [target])
    guard.fault_path.write_text(fault)
    guard.open()
    guard.close()
    v = guard.verdict("c")
    assert v.unavailable and v.crash is not None and v.crash.count == MAX_IDENTICAL_CRASHES
    assert "SIGSEGV" in (v.note() or "") and "execute" in (v.note() or "")


async def test_supervisor_stops_after_identical_failures() -> None:
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("same every time")

    job = Supervised("x")
    async with asyncio.timeout(10):
        await supervise(job, broken, initial_delay=0.001, max_delay=0.01)
    assert job.status == "failed"
    assert runs == 5
    assert "same every time" in (job.error or "")
