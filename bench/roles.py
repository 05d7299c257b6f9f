"""Memory and CPU per role (issue 21, item 3), and what crash isolation costs
(item 1): one JSON document.

Roles, each a real process (its whole process tree counted) against a private
Mosquitto, measured over ``--seconds`` after it is ready and ``--settle`` more:

* ``sensors``: ``mtor node`` with the default sensors node, idle;
* ``satellite``: a voice node listening for the wake word (microWakeWord
  okay_nabu + Silero VAD loaded) on a generated WAV of quiet noise played at
  real time, speech-to-text routed to the realm and no local whisper (its
  model path points nowhere), espeak-ng for speech;
* ``satellite_full``: the same with the default local whisper tiny.en and piper;
* ``camera``: a camera node on one generated 640x480 5 fps video (a box moving
  over a still background, looped), motion + the default local detectors: the
  worst case, something moves in every frame; ``camera_still``: the same scene
  without the box (motion detection only, as most of a camera's day);
* ``chat``: the chat node with the default model (SmolLM2-135M, llama.cpp), idle
  after loading and during one reply;
* ``orchestrator``: ``mtor orchestrator`` with 100 simulated peers
  (``bench.simnodes``; the orchestrator process alone is counted);
* ``up``: ``mtor up`` all-in-one against the bench's broker (orchestrator, node
  with every node type that works here, gateway; the broker's own RSS beside).

``isolation`` measures the two designs for native-backend crash isolation
(docs/operations.md, "Native backends"): the probe's price at a first start
and at a cached one, and what hosting a backend in a worker process would cost
(the worker's own RSS and start-up; a task's round trip over a pipe for a small
input, an 80 ms audio frame and a 640x480 frame).

    .venv/bin/python -m bench.roles [--seconds 30] [--settle 10] [--only satellite camera]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import yaml

from bench.common import ROOT, clean_env, cpu_seconds, emit, machine, mtor_command, new_realm, stop
from daemon.broker import PrivateBroker

TARGETS: Final[dict[str, dict[str, float]]] = {
    "satellite": {"rss_mb": 200.0, "cpu_percent": 5.0},
    "camera": {"rss_mb": 300.0},
}
READY_TIMEOUT: Final = 180.0
ROLES: Final = (
    "sensors",
    "satellite",
    "satellite_full",
    "camera",
    "camera_still",
    "chat",
    "orchestrator",
    "up",
)


# ------------------------------------------------------------- processes


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def status(pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
            elif key == "Name":
                out[key] = value.strip()
    return out


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        args = [a.decode(errors="replace") for a in raw if a]
        for i, a in enumerate(args):  # the interesting part: the mtor role / module
            if a in ("-m",) and i + 1 < len(args):
                return " ".join(args[i + 1 : i + 3])
        return " ".join(Path(a).name for a in args[:2])
    return "?"


class Sampler:
    """CPU of a process tree over a window (processes that came and went during it
    are missed: the roles measured here start their children before the window)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.pids = tree(root)
        self.cpu0 = {p: self._cpu(p) for p in self.pids}
        self.t0 = time.monotonic()

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            return cpu_seconds(pid)[0]
        except (OSError, ValueError):
            return 0.0

    def result(self) -> dict[str, Any]:
        window = time.monotonic() - self.t0
        procs = []
        for p in tree(self.root):
            st = status(p)
            if "VmRSS" not in st:
                continue
            cpu = self._cpu(p) - self.cpu0.get(p, 0.0)
            procs.append(
                {
                    "pid": p,
                    "what": cmdline(p),
                    "rss_mb": round(st["VmRSS"] / 1024, 1),
                    "peak_rss_mb": round(st.get("VmHWM", 0) / 1024, 1),
                    "rss_file_mb": round(st.get("RssFile", 0) / 1024, 1),
                    "cpu_percent": round(100 * cpu / window, 2),
                }
            )
        return {
            "window_s": round(window, 1),
            "rss_mb": round(sum(p["rss_mb"] for p in procs), 1),
            "peak_rss_mb": round(sum(p["peak_rss_mb"] for p in procs), 1),
            "cpu_percent": round(sum(p["cpu_percent"] for p in procs), 2),
            "processes": procs,
        }


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_text(path: Path, text: str, timeout: float) -> None:
    """Until ``text`` is in the file ``path`` (another process's output)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text} in {path.name}")
        time.sleep(0.2)


def show_errors(tmp: Path, role: str) -> None:
    """The tail of every log of the run that has an error in it, on stderr."""
    for log in tmp.glob("*.log"):
        tail = log.read_text(errors="replace")[-3000:]
        if "Traceback" in tail or "ERROR" in tail:
            print(f"--- {role} {log.name}:\n{tail}", file=sys.stderr)


# ----------------------------------------------------------------- inputs


def quiet_wav(path: Path, seconds: float) -> Path:
    """16 kHz mono int16 of faint noise (nobody speaks: the satellite just listens)."""
    rng = random.Random(21)
    frames = bytearray()
    for _ in range(int(16000 * seconds)):
        frames += struct.pack("<h", int(rng.gauss(0, 60)))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(frames))
    return path


def moving_box_video(
    path: Path, seconds: float = 20.0, fps: float = 5.0, *, box: bool = True
) -> Path:
    """640x480 at ``fps``: a grey still scene with a box walking across it."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (640, 480))
    base = np.full((480, 640, 3), 110, np.uint8)
    cv2.rectangle(base, (40, 300), (200, 460), (80, 90, 100), -1)
    for i in range(int(seconds * fps)):
        frame = base.copy()
        if box:
            x = int(20 + (i * 12) % 560)
            cv2.rectangle(frame, (x, 150), (x + 60, 330), (30, 40, 200), -1)
        writer.write(frame)
    writer.release()
    return path


# ------------------------------------------------------------------- roles


def node_yaml(tmp: Path, url: str, realm: str, nodes: dict[str, Any] | None) -> Path:
    data: dict[str, Any] = {
        "realm": realm,
        "node_id": "bench",
        "broker": {"url": url},
        "daemon": {"state_dir": str(tmp / "state")},
    }
    if nodes is not None:
        data["nodes"] = nodes
    path = tmp / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def role_nodes(role: str, tmp: Path) -> dict[str, Any]:
    if role == "sensors":
        return {"sensors": {"type": "sensors"}}
    if role in ("satellite", "satellite_full"):
        voice: dict[str, Any] = {
            "type": "voice",
            "source": {
                "type": "file",
                "path": str(quiet_wav(tmp / "quiet.wav", 600)),
                "realtime": True,
            },
            "wake": {"engine": "micro", "model": "okay_nabu"},
        }
        if role == "satellite":
            voice["stt"] = {"routing": "remote", "model_path": str(tmp / "no-whisper-here")}
            voice["tts"] = {"backend": "espeak"}
        return {"voice": voice}
    if role in ("camera", "camera_still"):
        video = moving_box_video(tmp / "scene.avi", box=role == "camera")
        return {
            "camera": {
                "type": "camera",
                "cameras": {"door": {"source": str(video), "fps": 5, "loop": True}},
            }
        }
    if role == "chat":
        return {"chat": {"type": "chat"}}
    raise ValueError(role)


async def wait_info(
    url: str, realm: str, node_id: str, pred: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    from daemon.bus import Bus, Inbound
    from daemon.config import build_config

    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_info(msg: Inbound) -> None:
        with contextlib.suppress(ValueError):
            got.put_nowait(json.loads(msg.payload or b"{}"))

    config = build_config({"realm": realm, "broker": {"url": url}})
    bus = Bus(config.broker, f"bench-roles-{os.getpid()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        await bus.subscribe(f"mtor/{realm}/node/{node_id}/info", on_info)
        async with asyncio.timeout(READY_TIMEOUT):
            while True:
                info = await got.get()
                if pred(info):
                    return info
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def settled(info: dict[str, Any]) -> bool:
    nodes = info.get("nodes") or []
    return bool(nodes) and all(n.get("status") in ("running", "failed") for n in nodes)


async def chat_reply(url: str, realm: str) -> float:
    """One chat reply through the realm (needs an orchestrator): seconds."""
    from daemon.bus import Bus
    from daemon.client import RealmClient
    from daemon.config import build_config

    config = build_config({"realm": realm, "broker": {"url": url}})
    bus = Bus(config.broker, f"bench-roles-chat-{os.getpid()}")
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        client = RealmClient(bus, realm, user="bench")
        await client.start()
        t0 = time.monotonic()
        await client.call(
            "chat", {"messages": [{"role": "user", "content": "Name three colours."}]}, timeout=120
        )
        return time.monotonic() - t0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def measure_role(
    role: str, broker: PrivateBroker, seconds: float, settle: float
) -> dict[str, Any]:
    realm = new_realm()
    with tempfile.TemporaryDirectory(prefix=f"mtor-roles-{role}-") as name:
        tmp = Path(name)
        procs: list[subprocess.Popen[bytes]] = []
        extra: dict[str, Any] = {}
        try:
            t0 = time.monotonic()
            if role == "orchestrator":
                cfg = tmp / "orch.yaml"
                cfg.write_text(
                    yaml.safe_dump(
                        {
                            "realm": realm,
                            "broker": {"url": broker.url},
                            "nodes": {},
                            "orchestrator": {"state_dir": str(tmp / "orch")},
                        }
                    )
                )
                main = spawn(
                    [*mtor_command(), "orchestrator", "--config", str(cfg)], tmp / "orch.log"
                )
                procs.append(main)
                sim_log = tmp / "sim.log"
                procs.append(
                    spawn(
                        [
                            sys.executable,
                            "-m",
                            "bench.simnodes",
                            "--broker",
                            broker.url,
                            "--realm",
                            realm,
                            "--count",
                            "100",
                        ],
                        sim_log,
                    )
                )
                await asyncio.to_thread(wait_text, sim_log, '"announced"', READY_TIMEOUT)
            elif role == "up":
                cfg = node_yaml(tmp, broker.url, realm, None)
                main = spawn(
                    [*mtor_command(), "up", "--config", str(cfg), "--broker", broker.url],
                    tmp / "up.log",
                )
                procs.append(main)
                info = await wait_info(broker.url, realm, "bench", settled)
                extra["nodes"] = [f"{n['name']}:{n['status']}" for n in info["nodes"]]
                brokers = [p for p in tree(os.getpid()) if status(p).get("Name") == "mosquitto"]
                extra["broker_rss_mb"] = sum(
                    round(status(p).get("VmRSS", 0) / 1024, 1) for p in brokers
                )
            else:
                cfg = node_yaml(tmp, broker.url, realm, role_nodes(role, tmp))
                if role == "chat":  # an orchestrator for the reply (not counted)
                    ocfg = tmp / "orch.yaml"
                    ocfg.write_text(
                        yaml.safe_dump(
                            {
                                "realm": realm,
                                "broker": {"url": broker.url},
                                "nodes": {},
                                "orchestrator": {"state_dir": str(tmp / "orch")},
                            }
                        )
                    )
                    procs.append(
                        spawn(
                            [*mtor_command(), "orchestrator", "--config", str(ocfg)],
                            tmp / "orch.log",
                        )
                    )
                main = spawn([*mtor_command(), "node", "--config", str(cfg)], tmp / "node.log")
                procs.insert(0, main)
                info = await wait_info(broker.url, realm, "bench", settled)
                extra["nodes"] = [
                    f"{n['name']}:{n['status']}"
                    + (f" ({n['error'][:120]})" if n.get("error") else "")
                    for n in info["nodes"]
                ]
                extra["capabilities"] = sorted(
                    {f"{c['name']}/{c.get('backend')}" for c in info.get("capabilities", [])}
                )
            extra["ready_s"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(settle)
            sampler = Sampler(main.pid)
            await asyncio.sleep(seconds)
            result = {"role": role, **sampler.result(), **extra}
            if role == "chat":
                sampler = Sampler(main.pid)
                result["reply_s"] = round(await chat_reply(broker.url, realm), 2)
                busy = sampler.result()
                result["during_reply"] = {
                    k: busy[k] for k in ("rss_mb", "peak_rss_mb", "cpu_percent", "window_s")
                }
            if main.poll() is not None:
                raise RuntimeError(f"{role} exited (status {main.returncode}): see its log")
            targets = TARGETS.get(role, {})
            if targets:
                result["targets"] = targets
                result["pass"] = {k: result[k] <= v for k, v in targets.items()}
            return result
        finally:
            for p in procs:
                with contextlib.suppress(Exception):
                    stop(p, 15)
            show_errors(tmp, role)


# --------------------------------------------------------------- isolation


def _worker(conn: Connection) -> None:
    """A backend host: what a worker process would be (the daemon's messages and
    numpy imported, as a backend's host needs), answering each request at once."""
    import numpy  # noqa: F401

    import daemon.node
    import daemon.protocol.node  # noqa: F401

    conn.send("ready")
    while True:
        msg = conn.recv_bytes()
        if not msg:
            return
        conn.send_bytes(msg[:64])


def _round_trips(conn: Connection, size: int, n: int) -> dict[str, float]:
    payload = os.urandom(size)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.send_bytes(payload)
        conn.recv_bytes()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "p50_ms": round(samples[len(samples) // 2], 3),
        "p99_ms": round(samples[math.ceil(len(samples) * 0.99) - 1], 3),
    }


async def measure_isolation(broker: PrivateBroker) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The probe: a first start (no verdicts) against a second (verdicts kept), with
    # every node type that works here (what `mtor up` hosts).
    with tempfile.TemporaryDirectory(prefix="mtor-roles-probe-") as name:
        tmp = Path(name)
        realm = new_realm()
        cfg = node_yaml(tmp, broker.url, realm, None)
        starts: list[dict[str, Any]] = []
        boots: list[str] = []
        for run in ("first_start", "cached_start"):
            t0 = time.monotonic()
            log = tmp / f"{run}.log"
            proc = spawn([*mtor_command(), "node", "--config", str(cfg)], log)
            try:
                info = await wait_info(
                    broker.url,
                    realm,
                    "bench",
                    lambda i: settled(i) and len(i["nodes"]) > 1 and i.get("boot_id") not in boots,
                )
                boots.append(info.get("boot_id", ""))
                took = time.monotonic() - t0
            finally:
                stop(proc, 15)
            probe_line = next(
                (ln for ln in log.read_text().splitlines() if "probe done" in ln), None
            )
            starts.append(
                {
                    "run": run,
                    "nodes": [n["name"] for n in info["nodes"]],
                    "all_settled_s": round(took, 2),
                    "probe": probe_line.split("daemon.probe: ")[-1] if probe_line else None,
                }
            )
        out["probe"] = starts
    from daemon.probe import Busy, fingerprint

    t0 = time.perf_counter()
    for _ in range(20):
        fingerprint()
    out["fingerprint_ms"] = round((time.perf_counter() - t0) / 20 * 1000, 2)
    with tempfile.TemporaryDirectory() as name:
        busy = Busy(Path(name) / "busy")
        busy.open()
        t0 = time.perf_counter()
        for _ in range(10_000):
            with busy.entered("vision"):
                pass
        out["busy_track_us_per_task"] = round((time.perf_counter() - t0) / 10_000 * 1e6, 2)
        busy.close()
    # A worker process per backend (the alternative): its own RSS and start-up, and
    # each task's round trip over a pipe.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    t0 = time.monotonic()
    worker = ctx.Process(target=_worker, args=(child,), daemon=True)
    worker.start()
    assert parent.recv() == "ready"
    start_s = time.monotonic() - t0
    assert worker.pid is not None
    st = status(worker.pid)
    out["worker_process"] = {
        "start_s": round(start_s, 3),
        "rss_mb": round(st.get("VmRSS", 0) / 1024, 1),
        "rss_anon_mb": round(st.get("RssAnon", 0) / 1024, 1),
        "round_trip": {
            "task_200B": _round_trips(parent, 200, 2000),
            "audio_frame_2560B": _round_trips(parent, 2560, 2000),
            "video_frame_640x480x3": _round_trips(parent, 640 * 480 * 3, 300),
        },
    }
    parent.send_bytes(b"")
    worker.join(5)
    return out


# -------------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "roles", "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    result["machine"] = machine()
    result["roles"] = {}
    for role in args.only or ROLES:
        with PrivateBroker() as broker:
            try:
                result["roles"][role] = await measure_role(role, broker, args.seconds, args.settle)
            except Exception as exc:  # one role failing must not lose the others
                result["roles"][role] = {"role": role, "error": f"{type(exc).__name__}: {exc}"}
        print(f"roles: {role} done", file=sys.stderr)
    if not args.no_isolation:
        with PrivateBroker() as broker:
            result["isolation"] = await measure_isolation(broker)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measuring window (s)")
    parser.add_argument("--settle", type=float, default=10.0, help="wait after ready (s)")
    parser.add_argument("--only", nargs="*", choices=ROLES, help="these roles only")
    parser.add_argument("--no-isolation", action="store_true", help="skip the isolation part")
    args = parser.parse_args()
    emit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
