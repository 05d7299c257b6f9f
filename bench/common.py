"""Shared pieces of the benchmarks: processes, /proc readings, a raw MQTT observer.

The observer is a plain aiomqtt client, not the project's ``Bus``, so what
is measured is the node daemon alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import yaml

from daemon import topics

ROOT = Path(__file__).resolve().parent.parent
# Where the raw-aiomqtt baseline client announces itself (bench/baseline_client.py).
BASELINE_STATE = topics.TopicPattern("bench/{realm}/{node_id}/state")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def mtor_command() -> list[str]:
    """How a user runs `mtor`: the console script next to this Python, else ``-m``."""
    script = Path(sys.executable).parent / "mtor"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "daemon.cli.main"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTOR_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def new_realm() -> str:
    return "bench" + uuid.uuid4().hex[:8]


def write_node_config(
    directory: Path, broker_url: str, realm: str, node_id: str, **sensors: Any
) -> Path:
    """A sensors-only node daemon: the default sensors node unless overridden."""
    data = {
        "realm": realm,
        "node_id": node_id,
        "broker": {"url": broker_url},
        "daemon": {"state_dir": str(directory / "state")},
        "nodes": {"sensors": {"type": "sensors", **sensors}},
    }
    path = directory / f"{node_id}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def spawn(args: Sequence[str], *, quiet: bool = True) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(args),
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, wait, SIGKILL if it will not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


# ------------------------------------------------------------------ /proc


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile and Threads from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own utime+stime, waited-for children's cutime+cstime) in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                model = line.partition(":")[2].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def summary(samples: Sequence[float], digits: int = 3) -> dict[str, Any]:
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "runs": len(samples),
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


# --------------------------------------------------------------- observer


@dataclass
class Seen:
    """A presence message: when it arrived and what it said."""

    arrived: float  # time.monotonic()
    wall: float  # time.time() at arrival
    retained: bool
    payload: dict[str, Any]

    def wall_time(self) -> float:
        """When it was sent: the payload's own ``ts`` for a retained replay, else arrival."""
        ts = self.payload.get("ts")
        if self.retained and isinstance(ts, int | float):
            return float(ts)
        return self.wall


@dataclass
class Observer:
    """Watches ``mtor/<realm>/node/+/state`` (and a baseline topic) on the broker."""

    host: str
    port: int
    realm: str
    seen: dict[str, list[Seen]] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def filters(self) -> list[str]:
        return [
            topics.NODE_STATE.filter(realm=self.realm),
            BASELINE_STATE.filter(realm=self.realm),
        ]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Observer]:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"bench-observer-{uuid.uuid4().hex[:6]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            for flt in self.filters:
                await client.subscribe(flt, qos=1)
            task = asyncio.create_task(self._pump(client))
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _pump(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            arrived, wall = time.monotonic(), time.time()
            raw = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                continue
            fields = topics.NODE_STATE.parse(msg.topic.value) or BASELINE_STATE.parse(
                msg.topic.value
            )
            if fields is None:
                continue
            node_id = fields["node_id"]
            async with self._changed:
                self.seen.setdefault(node_id, []).append(
                    Seen(arrived, wall, bool(msg.retain), payload)
                )
                self._changed.notify_all()

    async def wait_online(self, node_id: str, after: float, timeout: float) -> Seen:
        """The first ``online`` of ``node_id`` that arrived after monotonic time ``after``."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for s in self.seen.get(node_id, []):
                    if s.arrived >= after and s.payload.get("state") == "online":
                        return s
                await self._changed.wait()


def baseline_client(host: str, port: int, realm: str, client_id: str, *, once: bool) -> list[str]:
    args = [sys.executable, "-m", "bench.baseline_client", host, str(port), realm, client_id]
    return [*args, "--once"] if once else args
