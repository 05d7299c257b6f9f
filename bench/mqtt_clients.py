"""Three MQTT 5 clients side by side: raw request/response, throughput, latency, CPU.

    .venv/bin/python -m bench.mqtt_clients [--quick] [--rounds 6] [--seconds 2]
        [--seconds1 1] [--inflight 1 16] [--out FILE]

One private Mosquitto (TCP_NODELAY on, ``daemon.broker.PrivateBroker``) and,
for each client library, a responder process and a requester process:

* ``own``: the project's client, bare :class:`daemon.mqtt.Connection` objects
  (:mod:`bench.raw_echo`);
* ``paho``: paho-mqtt 2 with its own network thread, work done in its
  callbacks (:mod:`bench.paho_echo`);
* ``aiomqtt``: aiomqtt 2 (paho underneath, asyncio on top; :mod:`bench.mqtt_echo`).

Every round trip is MQTT 5, QoS 1 both ways, with a response topic and
correlation data; the same 29-byte payload.  The requester keeps 1 or 16
requests outstanding for a fixed time, then waits for the last replies.
All pairs stay connected for the whole run, idle while another is measured;
the order of the clients rotates from round to round (the machine is shared
and noisy), and the summary gives the median over rounds.

CPU per round trip = (requester + responder) process CPU time during the
timed window, from ``utime + stime`` of ``/proc/<pid>/stat`` (every thread of
the process, paho's network thread included), divided by the round trips.  The
broker's CPU is reported beside it and is not counted as client CPU.  The
requester reads all three itself, just before and after its timed window, so
process start, connect and warm-up are not counted.

JSON on stdout (and in ``--out``); progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final, Protocol

from bench import mqtt_echo, paho_echo, raw_echo
from bench.common import ROOT, clean_env, cpu_seconds, machine, stop
from bench.mqtt_echo import EchoClient
from bench.paho_echo import PAYLOAD, PahoRequester
from bench.raw_echo import RawEchoClient
from bench.realm import percentile
from daemon.broker import PrivateBroker

CLIENTS: Final = ("own", "paho", "aiomqtt")
# The responder has subscribed when a probe comes back; each probe waits this long.
PROBE_TIMEOUT: Final = 0.5
PROBES: Final = 40
# A requester that has not answered a command this long after its window is stuck.
ANSWER_GRACE: Final = 30.0
# Issue 14's target: the own client keeps >= 3x paho's throughput at 16 in flight.
TARGET_OWN_OVER_PAHO: Final = 3.0


# ------------------------------------------------------------ requester side


class Requester(Protocol):
    """What the child process drives: probes, then timed closed-loop windows."""

    async def probe(self, timeout: float) -> bool: ...

    async def run(self, seconds: float, inflight: int) -> tuple[list[float], float]: ...


def _process_cpu(pids: Sequence[int]) -> list[float]:
    return [cpu_seconds(pid)[0] for pid in pids]


async def _serve(requester: Requester, responder_pid: int, broker_pid: int) -> None:
    """Answer each JSON command line on stdin with one JSON result line on stdout."""
    for _ in range(PROBES):
        if await requester.probe(PROBE_TIMEOUT):
            break
    else:
        raise SystemExit("no answer from the responder")
    print(json.dumps({"ready": True}), flush=True)
    pids = [os.getpid(), responder_pid, broker_pid]
    # Read in a thread so the client's loop keeps running (keep-alive) between windows.
    while line := await asyncio.to_thread(sys.stdin.readline):
        cmd = json.loads(line)
        await requester.run(cmd["warmup"], cmd["inflight"])
        before = _process_cpu(pids)
        latencies, elapsed = await requester.run(cmd["seconds"], cmd["inflight"])
        after = _process_cpu(pids)
        req_s, resp_s, broker_s = (b - a for a, b in zip(before, after, strict=True))
        print(json.dumps(_result(latencies, elapsed, req_s, resp_s, broker_s)), flush=True)


def _result(
    latencies: list[float], elapsed: float, req_s: float, resp_s: float, broker_s: float
) -> dict[str, Any]:
    n = len(latencies)
    ordered = sorted(latencies)
    per_rt = 1e6 / max(n, 1)  # seconds -> microseconds per round trip
    return {
        "round_trips": n,
        "seconds": round(elapsed, 3),
        "per_s": round(n / elapsed, 1),
        "p50_ms": round(percentile(ordered, 50), 3),
        "p99_ms": round(percentile(ordered, 99), 3),
        "client_cpu_us_per_rt": round((req_s + resp_s) * per_rt, 1),
        "requester_cpu_us_per_rt": round(req_s * per_rt, 1),
        "responder_cpu_us_per_rt": round(resp_s * per_rt, 1),
        "broker_cpu_us_per_rt": round(broker_s * per_rt, 1),
        "client_cpu_percent": round((req_s + resp_s) / elapsed * 100, 1),
    }


class _AsyncRequester:
    """An asyncio client's ``call(payload)`` driven by ``inflight`` lanes on this loop."""

    def __init__(self, call: Callable[[bytes], Awaitable[Any]]) -> None:
        self.call = call

    async def probe(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.call(PAYLOAD)
        except TimeoutError:
            return False
        return True

    async def run(self, seconds: float, inflight: int) -> tuple[list[float], float]:
        latencies: list[float] = []
        start = time.perf_counter()
        deadline = start + seconds

        async def lane() -> None:
            while (t0 := time.perf_counter()) < deadline:
                await self.call(PAYLOAD)
                latencies.append((time.perf_counter() - t0) * 1000)

        async with asyncio.timeout(seconds + ANSWER_GRACE), asyncio.TaskGroup() as tg:
            for _ in range(inflight):
                tg.create_task(lane())
        return latencies, time.perf_counter() - start


class _ThreadedRequester:
    """paho's requester works on its own thread; this loop only waits for it."""

    def __init__(self, paho: PahoRequester) -> None:
        self.paho = paho

    async def probe(self, timeout: float) -> bool:
        return await asyncio.to_thread(self.paho.probe, timeout)

    async def run(self, seconds: float, inflight: int) -> tuple[list[float], float]:
        return await asyncio.to_thread(self.paho.run, seconds, inflight)


async def requester_main(
    client: str, host: str, port: int, topic: str, pids: Sequence[int]
) -> None:
    responder_pid, broker_pid = pids
    if client == "paho":
        paho = PahoRequester(host, port, topic)
        await asyncio.to_thread(paho.start)
        try:
            await _serve(_ThreadedRequester(paho), responder_pid, broker_pid)
        finally:
            await asyncio.to_thread(paho.stop)
        return
    make = RawEchoClient if client == "own" else EchoClient
    rr = make(host, port, topic)
    async with rr.running():
        await _serve(_AsyncRequester(rr.call), responder_pid, broker_pid)


# --------------------------------------------------------------- parent side


class Pair:
    """One client library's responder and requester processes."""

    def __init__(self, client: str, broker: PrivateBroker) -> None:
        assert broker.pid is not None
        self.client = client
        topic = f"bench/clients/{client}/{uuid.uuid4().hex[:8]}"
        where = [broker.host, str(broker.port), topic]
        me = [sys.executable, "-m", "bench.mqtt_clients"]
        self.responder = self._popen([*me, "--responder", client, *where])
        pids = [str(self.responder.pid), str(broker.pid)]
        self.requester = self._popen([*me, "--requester", client, *where, *pids], pipes=True)

    @staticmethod
    def _popen(args: list[str], *, pipes: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env=clean_env(),
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def _answer(self) -> dict[str, Any]:
        out: IO[str] | None = self.requester.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError(f"{self.client} requester exited ({self.requester.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ready(self) -> None:
        self._answer()

    def measure(self, seconds: float, inflight: int, warmup: float) -> dict[str, Any]:
        cmd = {"seconds": seconds, "inflight": inflight, "warmup": warmup}
        assert self.requester.stdin is not None
        self.requester.stdin.write(json.dumps(cmd) + "\n")
        self.requester.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.requester.stdin is not None:
            with contextlib.suppress(OSError):
                self.requester.stdin.close()  # EOF: the requester disconnects and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.requester.wait(5)
        for proc in (self.requester, self.responder):
            stop(proc)  # type: ignore[arg-type]  # stop() only signals and waits


@contextlib.contextmanager
def _pairs(broker: PrivateBroker, clients: Sequence[str]) -> Iterator[dict[str, Pair]]:
    pairs: dict[str, Pair] = {}
    try:
        for client in clients:
            pairs[client] = Pair(client, broker)
        for pair in pairs.values():
            pair.ready()
        yield pairs
    finally:
        for pair in pairs.values():
            pair.close()


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(r[key] for r in runs)), 3)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["per_s"] for r in runs]
    keys = (
        *("p50_ms", "p99_ms", "client_cpu_us_per_rt", "requester_cpu_us_per_rt"),
        *("responder_cpu_us_per_rt", "broker_cpu_us_per_rt", "client_cpu_percent"),
    )
    return {
        "per_s": _median(runs, "per_s"),
        "per_s_min": min(rates),
        "per_s_max": max(rates),
        **{key: _median(runs, key) for key in keys},
        "runs": runs,
    }


def ratios(results: dict[str, dict[str, Any]], inflight: int) -> dict[str, Any]:
    key = f"inflight_{inflight}"
    own = results["own"][key]
    out: dict[str, Any] = {}
    for other in ("paho", "aiomqtt"):
        if other in results:
            theirs = results[other][key]
            out[f"throughput_own_over_{other}"] = round(own["per_s"] / theirs["per_s"], 2)
            out[f"cpu_per_rt_{other}_over_own"] = round(
                theirs["client_cpu_us_per_rt"] / own["client_cpu_us_per_rt"], 2
            )
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {
        c: {k: [] for k in args.inflight} for c in args.clients
    }
    with PrivateBroker() as broker, _pairs(broker, args.clients) as pairs:
        for r in range(args.rounds):
            shift = r % len(args.clients)
            order = [*args.clients[shift:], *args.clients[:shift]]
            for inflight in args.inflight:
                seconds = args.seconds1 if inflight == 1 else args.seconds
                for client in order:
                    res = pairs[client].measure(seconds, inflight, args.warmup)
                    samples[client][inflight].append(res)
                    print(
                        f"round {r + 1}/{args.rounds} {client:8} {inflight:2} in flight: "
                        f"{res['per_s']:8.0f}/s p50 {res['p50_ms']:.3f} ms "
                        f"CPU {res['client_cpu_us_per_rt']:.0f} us/rt",
                        file=sys.stderr,
                    )
    results = {
        c: {f"inflight_{k}": summarise(runs) for k, runs in by_k.items()}
        for c, by_k in samples.items()
    }
    out: dict[str, Any] = {"clients": results}
    top = max(args.inflight)
    if "own" in results:
        out[f"ratios_inflight_{top}"] = ratios(results, top)
        if "paho" in results:
            ratio = out[f"ratios_inflight_{top}"]["throughput_own_over_paho"]
            out["target"] = {
                "throughput_own_over_paho_at_least": TARGET_OWN_OVER_PAHO,
                "inflight": top,
                "pass": ratio >= TARGET_OWN_OVER_PAHO,
            }
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.rstrip()  # porcelain lines start with a space

    # What the run imports that differs from the commit (others may be editing).
    changed = git("status", "--porcelain", "--", "daemon", "bench") or ""
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted": [line[3:] for line in changed.splitlines()],
    }


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("paho-mqtt", "aiomqtt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        banner = subprocess.run(
            ["mosquitto", "-h"], check=False, capture_output=True, text=True, timeout=10
        )
        out["mosquitto"] = (banner.stdout or banner.stderr).splitlines()[0].split()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        out["mosquitto"] = None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="~20 s: 3 rounds, short windows")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, client order rotated")
    parser.add_argument("--seconds", type=float, default=2.0, help="window with >1 in flight (s)")
    parser.add_argument("--seconds1", type=float, default=1.0, help="window at 1 in flight (s)")
    parser.add_argument("--warmup", type=float, default=0.3, help="untimed lead-in per window (s)")
    parser.add_argument("--inflight", type=int, nargs="+", default=[1, 16], help="in flight")
    parser.add_argument(
        "--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS, help="clients to measure"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.rounds, args.seconds, args.seconds1, args.warmup = 3, 0.8, 0.4, 0.2
    started = time.monotonic()
    out: dict[str, Any] = {
        "benchmark": "mqtt_clients",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": _git(),
        "machine": machine(),
        "versions": _versions(),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "seconds_at_1": args.seconds1,
            "warmup": args.warmup,
            "inflight": args.inflight,
            "payload_bytes": len(PAYLOAD),
            "qos": 1,
        },
        **measure(args),
    }
    out["wall_s"] = round(time.monotonic() - started, 1)
    return out


def responder_main(client: str, host: str, port: int, topic: str) -> None:
    if client == "paho":
        paho_echo.respond(host, port, topic)
    else:
        respond = raw_echo.respond if client == "own" else mqtt_echo.respond
        asyncio.run(respond(host, port, topic))


def _quiet_aiomqtt() -> None:
    # aiomqtt warns "There are N pending publish calls" past 10 unacknowledged
    # publishes: at 16 in flight that is thousands of lines a second, and the
    # printing, not the client, would be measured.
    logging.getLogger("mqtt").setLevel(logging.ERROR)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--requester", "--responder"):
        _quiet_aiomqtt()
        client, host, port, topic, *pids = sys.argv[2:]
        with contextlib.suppress(KeyboardInterrupt):
            if sys.argv[1] == "--responder":
                responder_main(client, host, int(port), topic)
            else:
                pid_list = [int(p) for p in pids]
                asyncio.run(requester_main(client, host, int(port), topic, pid_list))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    out = run(args)
    text = json.dumps(out, indent=2, ensure_ascii=False) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
