"""Property-based fuzzing of a real realm: hostile input never takes a daemon down.

Real ``mtor orchestrator`` and ``mtor node`` processes on a private Mosquitto.
The topic filters they subscribed to are read from the broker's log
(``log_type subscribe``), so the fuzz follows the topic space as it changes;
hypothesis fills each filter's ``+``/``#`` with odd but legal levels and sends
generated payloads (random bytes, invalid UTF-8, surrogate escapes, U+0000,
huge strings, deep nesting, every registered message type with mutated
fields, wrong types), retained or not, QoS 0 or 1, with and without MQTT 5
properties (response topics anywhere, odd text, random correlation data).

Afterwards: both processes alive with the same pid, RSS grown by less than
``MAX_RSS_GROWTH_MB``, no RecursionError in their output, and an ordinary echo
task still succeeds through the orchestrator.  Derandomized (reproducible),
no shrinking: a failure names the last messages sent.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.fuzz import BROKER_CONFIG, FUZZ_PREFIX, RawPublisher, dump, sample, subscribed_filters
from daemon.broker import PrivateBroker
from daemon.client import RealmClient, TaskFailed
from daemon.messages import MAX_PAYLOAD_BYTES, registered_types
from daemon.mqtt import codec
from tests.conftest import ROOT, make_config, mtor_env, running_bus

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES: Final = 600  # each sends 1-6 messages; the whole file stays well under 90 s
MAX_RSS_GROWTH_MB: Final = 100
READY_TIMEOUT: Final = 30.0

# ------------------------------------------------------------------ strategies

# Legal in a topic level and in any MQTT string: no '/', wildcards, control characters
# (U+0000 included: Mosquitto closes a connection that sends one), surrogates or
# unassigned code points.  The broker would drop the fuzzer, not test the daemons.
LEVEL_CHARS: Final = st.characters(
    blacklist_categories=("Cs", "Cc", "Cn", "Co"), blacklist_characters="/+#"
)
TEXT_CHARS: Final = st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"))

levels = st.one_of(
    st.text(LEVEL_CHARS, min_size=1, max_size=24),
    st.sampled_from(["", " ", "..", "$x", "é", "\U0001f600", "w1", "orch", "echo", "x" * 2000]),
)


@st.composite
def topic_for(draw: st.DrawFn, topic_filter: str) -> str:
    """A concrete topic ``topic_filter`` matches ('+' and '#' filled in)."""
    out: list[str] = []
    for level in topic_filter.split("/"):
        if level == "+":
            out.append(draw(levels))
        elif level == "#":
            out += draw(st.lists(levels, max_size=3))
        else:
            out.append(level)
    return "/".join(out) or "x"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(TEXT_CHARS, max_size=40),
    st.text(st.characters(), max_size=8),  # lone surrogates and U+0000 included
    st.integers(min_value=1_000, max_value=300_000).map(lambda n: "x" * n),
)
hostile_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """A registered message type, some of its fields set to hostile values, dropped or
    added, or its header (type, v) changed."""
    name = draw(st.sampled_from(sorted(registered_types())))
    cls = registered_types()[name]
    data: dict[str, Any] = {"type": name, "v": cls.VERSION, **sample(cls)}
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add", "header"]))
        field = draw(st.sampled_from(sorted(data)))
        if action == "set":
            data[field] = draw(hostile_values)
        elif action == "drop":
            data.pop(field, None)
        elif action == "add":
            data[draw(st.text(max_size=10))] = draw(hostile_values)
        else:
            data[draw(st.sampled_from(["type", "v"]))] = draw(hostile_values)
    return data


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kinds = ["message"] * 4 + ["bytes", "deep", "huge", "broken", "json", "empty"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return b""
    if kind == "json":
        return dump(draw(hostile_values), ascii_only=draw(st.booleans()))
    if kind == "deep":
        depth = draw(st.sampled_from([31, 32, 33, 200, 1_000, 100_000]))
        inner = b"[" * depth + (b"]" * depth if draw(st.booleans()) else b"")
        return b'{"type":"task.submit","v":1,"capability":"echo","input":' + inner + b"}"
    data = draw(messages())
    if kind == "huge":
        size = draw(st.sampled_from([100_000, MAX_PAYLOAD_BYTES - 100, MAX_PAYLOAD_BYTES + 100]))
        data[draw(st.sampled_from(sorted(data)))] = "y" * size
    raw = dump(data, ascii_only=draw(st.booleans()))
    if kind == "broken":  # invalid UTF-8, an escape that is no character, or a cut
        at = draw(st.integers(0, len(raw)))
        junk = draw(
            st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc3", b"\\ud800", b"\\u0000", b""])
        )
        raw = raw[:at] + junk + raw[at + (0 if junk else 1) :]
    return raw


def properties(realm: str) -> st.SearchStrategy[bytes]:
    """MQTT 5 publish properties, odd but legal."""
    response_topics = st.one_of(
        st.none(),
        st.builds(lambda level: f"mtor/{realm}/reply/{level}/x", levels),
        st.sampled_from(
            [
                f"mtor/{realm}/task/submit/x",
                f"mtor/{realm}/node/w1/task",
                f"mtor/{realm}/reply/" + "z" * 3000,
                "$SYS/x",
                "elsewhere/é \U0001f600",
                "/",
            ]
        ),
    )
    texts = st.text(LEVEL_CHARS, max_size=8)
    return st.builds(
        lambda rt, cd, ct, up: codec.publish_properties(
            response_topic=rt, correlation_data=cd, content_type=ct, user_properties=up
        ),
        response_topics,
        st.one_of(st.none(), st.binary(min_size=1, max_size=40)),
        st.one_of(st.none(), st.text(TEXT_CHARS, max_size=20)),
        st.one_of(st.none(), st.dictionaries(texts, texts, max_size=3)),
    )


# ------------------------------------------------------------------- the realm


@dataclass
class FuzzRealm:
    broker: PrivateBroker
    realm: str
    log: Path
    procs: dict[str, subprocess.Popen[bytes]]
    outputs: dict[str, Path]


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def echo(realm: FuzzRealm, value: Any, timeout: float) -> Any:
    """An echo task through the orchestrator, retried until ``timeout`` (start-up)."""
    config = make_config(realm.broker.url, realm.realm)
    async with running_bus(config, f"{FUZZ_PREFIX}check-{uuid.uuid4().hex[:6]}") as bus:
        client = RealmClient(bus, realm.realm)
        await client.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await asyncio.wait_for(client.call("echo", value, timeout=5), 6)
            except (TimeoutError, TaskFailed):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.fixture
def fuzz_realm(tmp_path: Path) -> Iterator[FuzzRealm]:
    log = tmp_path / "mosquitto.log"
    realm = "fz" + uuid.uuid4().hex[:8]
    with PrivateBroker(extra_config=BROKER_CONFIG.format(log=log)) as broker:
        common = {"realm": realm, "broker": {"url": broker.url}, "logging": {"level": "warning"}}
        configs = {
            "orchestrator": _write(
                tmp_path / "orch.yaml",
                {
                    **common,
                    "node_id": "orch",
                    "daemon": {"state_dir": str(tmp_path / "orch-daemon")},
                    # Stats often: the snapshot of what the registry took in is encoded.
                    "orchestrator": {
                        "state_dir": str(tmp_path / "orch-state"),
                        "stats_interval": 0.5,
                    },
                    "nodes": {},
                },
            ),
            "node": _write(
                tmp_path / "w1.yaml",
                {
                    **common,
                    "node_id": "w1",
                    "daemon": {"state_dir": str(tmp_path / "w1-state")},
                    "nodes": {"ref": {"type": "reference", "max_concurrency": 8}},
                },
            ),
        }
        procs: dict[str, subprocess.Popen[bytes]] = {}
        outputs: dict[str, Path] = {}
        try:
            for role, path in configs.items():
                outputs[role] = tmp_path / f"{role}.out"
                with outputs[role].open("wb") as out:  # a file: a full pipe would block it
                    procs[role] = subprocess.Popen(
                        [sys.executable, "-m", "daemon.cli.main", role, "--config", str(path)],
                        env=mtor_env(),
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            env = FuzzRealm(broker, realm, log, procs, outputs)
            assert asyncio.run(echo(env, "ready", READY_TIMEOUT)) == "ready"
            yield env
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def _tracebacks(output: str) -> Iterator[str]:
    """'<handler>: <exception line>' of every traceback in a daemon's output."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            handler = lines[i - 1].split(" failed on ")[0].rsplit(" ", 1)[-1] if i else "?"
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), i)
            yield f"{handler}: {lines[end][:160]}"


def test_hostile_input_never_takes_a_daemon_down(fuzz_realm: FuzzRealm) -> None:
    env = fuzz_realm
    found = subscribed_filters(env.log)
    assert len(found) >= 2, f"expected the orchestrator's and the node's subscriptions: {found}"
    filters = sorted(set().union(*found.values()))
    assert any("+" in f or "#" in f for f in filters)
    pids = {role: proc.pid for role, proc in env.procs.items()}
    rss0 = {role: _rss_mb(pid) for role, pid in pids.items()}
    publisher = RawPublisher(env.broker.host, env.broker.port)
    recent: collections.deque[tuple[str, bytes, bool]] = collections.deque(maxlen=12)
    props = properties(env.realm)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 6))):
            topic = data.draw(topic_for(data.draw(st.sampled_from(filters))))
            payload = data.draw(payloads())
            retain = data.draw(st.booleans())
            recent.append((topic[:120], payload[:120], retain))
            publisher.publish(
                topic,
                payload,
                qos=data.draw(st.sampled_from([0, 1])),
                retain=retain,
                props=data.draw(st.one_of(st.just(b"\x00"), props)),
            )
        for role, proc in env.procs.items():
            assert proc.poll() is None, f"{role} ended ({proc.returncode}) after {list(recent)}"

    try:
        fuzz()
    finally:
        publisher.close()
    assert publisher.reconnects == 0, "the broker dropped the fuzzer: it sent illegal MQTT"
    assert publisher.sent >= FUZZ_EXAMPLES
    # Still working, and the same processes.
    assert asyncio.run(echo(env, {"after": "fuzz"}, 30)) == {"after": "fuzz"}
    for role, proc in env.procs.items():
        assert proc.poll() is None and proc.pid == pids[role], f"{role} restarted or ended"
        grown = _rss_mb(proc.pid) - rss0[role]
        assert grown < MAX_RSS_GROWTH_MB, f"{role} grew by {grown:.0f} MB"
        output = env.outputs[role].read_text(errors="replace")
        assert "RecursionError" not in output
        # Handler errors are isolated (logged, dispatch goes on): listed, not failed on.
        for failure in sorted(set(_tracebacks(output))):
            print(f"{role}: handler traceback: {failure}")
