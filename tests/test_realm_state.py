"""Realm state store: set/get round trip through a real orchestrator and broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.broker import PrivateBroker
from daemon.bus import Bus
from daemon.messages import decode, encode
from daemon.orchestrator.service import Orchestrator
from daemon.orchestrator.state import StateView
from daemon.protocol.state import RealmState, StateReply, StateSet
from tests.conftest import Collector, make_config, running_bus


@pytest.fixture
async def orch(broker: PrivateBroker, realm: str, tmp_path: Path) -> AsyncIterator[Orchestrator]:
    cfg = make_config(
        broker.url,
        realm,
        orchestrator={
            "state_dir": str(tmp_path),
            "state_values": {"armed": ["disarmed", "armed_away"], "level": [1, 2]},
        },
    )
    o = Orchestrator(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(o.run(stop))
    await asyncio.wait_for(o._online.wait(), 10)
    try:
        yield o
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def _request(
    bus: Bus, realm: str, key: str, payload: bytes, *, got: Collector, n: int
) -> StateReply:
    await bus.publish(
        f"mtor/{realm}/state/{key}/set/test",
        payload,
        response_topic=f"mtor/{realm}/reply/test/state",
        correlation_data=str(n).encode(),
    )
    msg = await got.wait_for(lambda m: m.correlation_data == str(n).encode(), timeout=5)
    return decode(msg.payload, StateReply)


async def test_set_get_round_trip_and_refusals(orch: Orchestrator, realm: str) -> None:
    async with running_bus(orch.config) as bus:
        replies = Collector()
        await bus.subscribe(f"mtor/{realm}/reply/test/state", replies)
        retained = Collector()
        await bus.subscribe(f"mtor/{realm}/state/+", retained)

        # 'by' in the payload is a claim: the record names the topic's account.
        ok = await _request(
            bus, realm, "armed", encode(StateSet(value="armed_away", by="alice")), got=replies, n=1
        )
        assert ok.ok and ok.value == "armed_away"
        msg = await retained.wait_for(lambda m: m.topic.endswith("/state/armed"))
        st = decode(msg.payload, RealmState)
        assert (st.value, st.by) == ("armed_away", "test")
        assert orch.state.get("armed") == "armed_away"

        cases = {
            ("armed", encode(StateSet(value="armed_sideways"))): "bad_value",
            ("level", encode(StateSet(value=True))): "bad_value",  # a bool is not the int 1
            ("Bad-Key", encode(StateSet(value=1))): "bad_request",
            ("armed", b"not json"): "bad_request",
            ("armed", b'{"value": "disarmed", "extra": 1}'): "bad_request",
            ("mode", encode(StateSet(value={"nested": 1}))): "bad_request",
        }
        for i, ((key, payload), code) in enumerate(cases.items(), start=10):
            reply = await _request(bus, realm, key, payload, got=replies, n=i)
            assert not reply.ok and reply.error is not None, (key, payload)
            assert reply.error.code == code, (key, payload, reply.error)
        assert orch.state.get("armed") == "armed_away"  # nothing above changed it

        ok = await _request(bus, realm, "level", b'{"value": 2}', got=replies, n=30)
        assert ok.ok and orch.state.get("level") == 2
        # A free key (not in state_values) takes any scalar.
        ok = await _request(bus, realm, "mode", b'{"value": "party"}', got=replies, n=31)
        assert ok.ok and orch.state.get("mode") == "party"

    # A newcomer learns every value from the retained topics (what a camera node does).
    async with running_bus(orch.config) as bus2:
        view = StateView(bus2, realm)
        changed: list[tuple[str, object]] = []

        async def seen(key: str, value: object, _old: object) -> None:
            changed.append((key, value))

        view.on_change(seen)
        await view.start()
        async with asyncio.timeout(5):
            while view.snapshot() != {"armed": "armed_away", "level": 2, "mode": "party"}:
                await asyncio.sleep(0.02)
        assert ("armed", "armed_away") in changed


async def test_quick_sets_keep_the_last_value(orch: Orchestrator) -> None:
    for value in ("disarmed", "armed_away", "disarmed", "armed_away"):
        await orch.state.set("armed", value, by="test")
    async with asyncio.timeout(5):  # until every echo came back from the broker
        while orch.state._pending:
            await asyncio.sleep(0.01)
    assert orch.state.get("armed") == "armed_away"
