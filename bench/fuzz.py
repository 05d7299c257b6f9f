"""Hostile input under load: how much junk the orchestrator absorbs while it
keeps answering a steady trickle of echo tasks.

Real ``mtor orchestrator`` and ``mtor node`` (reference echo) processes on a
private Mosquitto (``max_queued_messages 0``: the broker drops nothing, so
everything sent is eventually taken apart by the orchestrator).  The topic
filters the orchestrator subscribed to are read from the broker's log
(``log_type subscribe``), not hard-coded; a corpus of hostile messages is made
for them (random bytes, invalid UTF-8, surrogate escapes, U+0000, deep
nesting, large strings, every registered message type with mutated fields,
odd response topics) and flooded from a thread over a raw MQTT connection
(QoS 1, each acknowledged by the broker) for ``--seconds``, while this
process submits one echo task every ``--every`` seconds through
:class:`~daemon.client.RealmClient`.  The same trickle runs first without the
flood: the baseline.

Reported: hostile messages per second sent during the flood; messages per
second *absorbed* (all sent, over the time until the orchestrator answered the
first echo submitted after the flood ended: its backlog was drained by then);
echo p50/p90 during the flood vs the baseline; the orchestrator's CPU % and
RSS; whether it is still the same process.

    .venv/bin/python -m bench.fuzz [--seconds 10] [--baseline 5] [--every 0.05] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import socket
import tempfile
import threading
import time
import types
import typing
import uuid
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

import daemon.protocol  # noqa: F401  (registers every message type)
from bench.common import emit, machine, rss_kib
from bench.realm import CpuMeter, Realm, percentile
from daemon.broker import PrivateBroker
from daemon.messages import MAX_PAYLOAD_BYTES, registered_types
from daemon.mqtt import codec
from daemon.topics import strip_share

# Mosquitto's log line for a SUBSCRIBE (with `log_type subscribe`): "<ts>: <client> <qos> <filter>".
SUBSCRIBE_LOG: Final = re.compile(r"^\d+: (\S+) [012] (\S+)$")
FUZZ_PREFIX: Final = "fuzz-"  # client ids of the fuzzer and of its checks
BROKER_CONFIG: Final = "log_type subscribe\nlog_dest file {log}\n"
CORPUS: Final = 4000  # distinct hostile messages, sent round and round
ECHO_TIMEOUT: Final = 60.0


def subscribed_filters(log: Path, ignore: tuple[str, ...] = (FUZZ_PREFIX,)) -> dict[str, set[str]]:
    """The topic filters each client subscribed to, from Mosquitto's log
    (clients whose id starts with one of ``ignore`` left out)."""
    found: dict[str, set[str]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = SUBSCRIBE_LOG.match(line)
        if m and not m.group(1).startswith(ignore):
            found.setdefault(m.group(1), set()).add(strip_share(m.group(2)))
    return found


# ------------------------------------------------------------ what to send


def _value(annotation: Any, name: str) -> Any:
    """A plausible valid value for a field of a message (mutations make it hostile)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return args[0]
    if origin in (typing.Union, types.UnionType):
        return _value(next(a for a in args if a is not type(None)), name)
    if origin is typing.Annotated:
        return _value(args[0], name)
    if origin is list:
        return []
    if origin is tuple:
        return [_value(a, name) for a in args]
    if origin is dict:
        return {}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return sample(annotation)
    if annotation is str:
        return {"capability": "echo", "node": "w1", "node_id": "w1"}.get(name, "x")
    if annotation is int:
        return 1
    if annotation is float:
        return 0.5
    if annotation is bool:
        return True
    return None


def sample(cls: type[BaseModel]) -> dict[str, Any]:
    """Every field of ``cls`` with a plausible value, as JSON-ready data."""
    return {name: _value(f.annotation, name) for name, f in cls.model_fields.items()}


def dump(data: Any, *, ascii_only: bool) -> bytes:
    """JSON as a hostile client may write it: a lone surrogate in a str goes out as the
    escape \\udXXX (``ascii_only``) or as the bytes ED A0 80 (not UTF-8)."""
    text = json.dumps(data, ensure_ascii=ascii_only, allow_nan=True, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


ODD_TEXT: Final = ["\ud800", "a\0b", "\udfff", "\U0001f600", "é", "", " ", "..", "x" * 300]
ODD_VALUES: Final = [None, True, -1, 1 << 70, float("nan"), float("inf"), [], {}, "x", *ODD_TEXT]


def _level(rng: random.Random) -> str:
    return rng.choice(["w1", "orch", "echo", "", " ", "é", "\U0001f600", "$x", "..", "x" * 500])


def concrete(topic_filter: str, rng: random.Random) -> str:
    """A topic ``topic_filter`` matches, '+' and '#' filled with odd but legal levels."""
    out: list[str] = []
    for level in topic_filter.split("/"):
        if level == "+":
            out.append(_level(rng))
        elif level == "#":
            out += [_level(rng) for _ in range(rng.randint(0, 2))]
        else:
            out.append(level)
    return "/".join(out) or "x"


def hostile_payload(rng: random.Random) -> bytes:
    kind = rng.choice(["message"] * 4 + ["bytes", "deep", "large", "broken", "json"])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 200))
    if kind == "json":
        return dump(rng.choice(ODD_VALUES), ascii_only=rng.random() < 0.5)
    if kind == "deep":
        depth = rng.choice([33, 200, 5_000, 50_000])
        return b'{"capability":"echo","input":' + b"[" * depth + b"]" * depth + b"}"
    name = rng.choice(sorted(registered_types()))
    cls = registered_types()[name]
    data: dict[str, Any] = {"type": name, "v": cls.VERSION, **sample(cls)}
    for _ in range(rng.randint(0, 3)):
        field = rng.choice(sorted(data))
        data[field] = rng.choice(ODD_VALUES)
    if kind == "large":
        data[rng.choice(sorted(data))] = "y" * rng.choice([10_000, 100_000, MAX_PAYLOAD_BYTES + 1])
    raw = dump(data, ascii_only=rng.random() < 0.5)
    if kind == "broken":
        at = rng.randint(0, len(raw))
        raw = raw[:at] + rng.choice([b"\xff", b"\xed\xa0\x80", b"\\ud800", b"\\u0000"]) + raw[at:]
    return raw


def hostile_props(realm: str, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b"\x00"
    response_topic = rng.choice(
        [
            f"mtor/{realm}/reply/{_level(rng)}/x",
            f"mtor/{realm}/task/submit/x",
            f"mtor/{realm}/node/w1/task",
            "$SYS/x",
            "elsewhere/é \U0001f600",
        ]
    )
    return codec.publish_properties(
        response_topic=response_topic, correlation_data=rng.randbytes(rng.randint(1, 16))
    )


def corpus(filters: list[str], realm: str, n: int, seed: int) -> list[tuple[str, bytes, bytes]]:
    """``n`` hostile (topic, payload, properties) for the given filters, reproducibly."""
    rng = random.Random(seed)
    return [
        (concrete(rng.choice(filters), rng), hostile_payload(rng), hostile_props(realm, rng))
        for _ in range(n)
    ]


# --------------------------------------------------------------- publisher


class RawPublisher:
    """A blocking MQTT 5 client that only publishes; QoS 1 waits for the broker's PUBACK.

    What it sends is legal MQTT, so the broker should never drop it; if it does,
    it reconnects and counts (``reconnects``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.client_id = f"{FUZZ_PREFIX}{uuid.uuid4().hex[:8]}"
        self.sock: socket.socket | None = None
        self.reconnects = 0
        self.sent = 0
        self._packet_id = 0
        self._buf = b""
        self._connect()

    def _connect(self) -> None:
        self.close()
        sock = socket.create_connection((self.host, self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(codec.encode_connect(self.client_id, keepalive=0))
        self.sock, self._buf = sock, b""
        first, body = self._read()
        if first >> 4 != codec.CONNACK or codec.decode_connack(body)[1] >= 0x80:
            raise ConnectionError(f"the broker refused the fuzzer: {body!r}")

    def _read(self) -> tuple[int, bytes]:
        assert self.sock is not None
        while True:
            packets, _used = codec.split_packets(self._buf)
            if packets:
                self._buf = self._buf[codec.packet_size(self._buf) :]
                return packets[0]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the broker closed the connection")
            self._buf += data

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        props: bytes = b"\x00",
    ) -> None:
        self._packet_id = self._packet_id % 65_535 + 1
        packet = codec.encode_publish(
            topic.encode(), payload, qos=qos, retain=retain, packet_id=self._packet_id, props=props
        )
        try:
            assert self.sock is not None
            self.sock.sendall(packet)
            while qos:
                first, body = self._read()
                if first >> 4 == codec.PUBACK and codec.decode_ack(body)[0] == self._packet_id:
                    break
        except OSError:  # ConnectionError included
            self.reconnects += 1
            self._connect()
        self.sent += 1

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendall(codec.DISCONNECT_PACKET)
            self.sock.close()
            self.sock = None


# ------------------------------------------------------------------- bench


def orchestrator_filters(found: dict[str, set[str]]) -> list[str]:
    """The filters of the client that takes submissions (the orchestrator)."""
    for filters in found.values():
        if any("/task/submit/" in f for f in filters):
            return sorted(filters)
    raise RuntimeError(f"no client subscribed to task submissions: {found}")


async def trickle(realm: Realm, every: float, stop: asyncio.Event) -> list[float]:
    """One echo task at a time, one every ``every`` s, until ``stop``: latencies (ms)."""
    latencies: list[float] = []
    n = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        n += 1
        async with asyncio.timeout(ECHO_TIMEOUT):
            assert await realm.call("echo", n) == n
        latencies.append((time.perf_counter() - t0) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, every - (time.perf_counter() - t0)))
    return latencies


def _summary(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "n": len(ordered),
        "p50_ms": round(percentile(ordered, 50), 3),
        "p90_ms": round(percentile(ordered, 90), 3),
        "max_ms": round(ordered[-1], 3),
    }


async def timed_trickle(realm: Realm, every: float, seconds: float) -> list[float]:
    stop = asyncio.Event()
    task = asyncio.create_task(trickle(realm, every, stop))
    await asyncio.sleep(seconds)
    stop.set()
    return await task


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    log = tmp / "mosquitto.log"
    extra = BROKER_CONFIG.format(log=log) + "max_queued_messages 0\n"
    with PrivateBroker(extra_config=extra) as broker:
        realm = Realm(broker, tmp)
        async with realm.running():
            await realm.start_worker("w1", 8)
            await realm.start_orchestrator(profile=args.profile)
            orch_pid = realm.procs["orchestrator"].pid
            filters = orchestrator_filters(subscribed_filters(log, (FUZZ_PREFIX, "bench-")))
            messages = corpus(filters, realm.realm, CORPUS, args.seed)
            baseline = await timed_trickle(realm, args.every, args.baseline)

            stop = threading.Event()
            publisher = RawPublisher(broker.host, broker.port)

            def flood() -> None:
                i = 0
                while not stop.is_set():
                    topic, payload, props = messages[i % len(messages)]
                    publisher.publish(topic, payload, props=props)
                    i += 1

            rss0 = rss_kib(orch_pid)["VmRSS"]
            meter = CpuMeter({"orchestrator": orch_pid})
            t0 = time.perf_counter()
            thread = threading.Thread(target=flood, name="fuzz-flood", daemon=True)
            thread.start()
            try:
                during = await timed_trickle(realm, args.every, args.seconds)
            finally:
                stop.set()
                await asyncio.to_thread(thread.join, 30)
            sent, flood_s = publisher.sent, time.perf_counter() - t0
            publisher.close()
            cpu = meter.read()["orchestrator"]
            # Drained: the first echo submitted after the flood is answered after it.
            async with asyncio.timeout(ECHO_TIMEOUT * 4):
                assert await realm.call("echo", "drained") == "drained"
            drained_s = time.perf_counter() - t0
            alive = realm.procs["orchestrator"].poll() is None
            rss1 = rss_kib(orch_pid)["VmRSS"] if alive else None
    return {
        "filters": filters,
        "flood_s": round(flood_s, 2),
        "hostile_sent": sent,
        "hostile_sent_per_s": round(sent / flood_s, 1),
        "hostile_absorbed_per_s": round(sent / drained_s, 1),
        "drained_after_s": round(drained_s - flood_s, 2),
        "publisher_reconnects": publisher.reconnects,
        "echo_baseline": _summary(baseline),
        "echo_during_flood": _summary(during),
        "echo_p50_ratio": round(
            percentile(sorted(during), 50) / percentile(sorted(baseline), 50), 2
        ),
        "orchestrator_cpu_percent": cpu,
        "orchestrator_rss_mb": {
            "before": round(rss0 / 1024, 1),
            "after": round(rss1 / 1024, 1) if rss1 else None,
        },
        "orchestrator_alive_same_pid": alive,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=10.0, help="flood duration")
    parser.add_argument("--baseline", type=float, default=5.0, help="trickle without flood (s)")
    parser.add_argument("--every", type=float, default=0.05, help="seconds between echo tasks")
    parser.add_argument("--seed", type=int, default=1, help="corpus seed")
    parser.add_argument(
        "--profile", type=Path, default=None, help="run the orchestrator under cProfile"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mtor-bench-fuzz-") as tmp:
        return {"benchmark": "fuzz", **await measure(args, Path(tmp))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    emit({"machine": machine(), **asyncio.run(run(parser.parse_args()))})


if __name__ == "__main__":
    main()
