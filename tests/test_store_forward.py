"""Store-and-forward of node events (issue 15, items 3 and 4): a node cut off from
the broker while producing events, then back; a daemon killed with -9 while cut off
and started again; a full spool.  A subscriber counts lost, duplicated and
out-of-order events by (boot_id, seq), as docs/protocol.md §6.1 tells consumers to.

The cut lasts ``MTOR_STORE_FORWARD_CUT_S`` seconds (5 by default; issue 15 asks
for 30: ``MTOR_STORE_FORWARD_CUT_S=30``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from daemon.broker import PrivateBroker
from daemon.bus import Bus, Inbound
from daemon.messages import decode
from daemon.protocol.node import Event, NodeHealth
from daemon.spool import WINDOW, EventSpool, spool_path
from tests.cable import Cable
from tests.conftest import MtorProcess, make_config, running_bus

CUT_S = float(os.environ.get("MTOR_STORE_FORWARD_CUT_S", "5"))
RATE_HZ = 20  # the sensor's reads (and events) per second
NODE = "edge1"


@dataclass
class Tally:
    """A consumer of one node's events, by the rules of docs/protocol.md §6.1."""

    seen: dict[tuple[str, int], float] = field(default_factory=dict)  # key -> when received
    duplicated: list[tuple[str, int]] = field(default_factory=list)
    out_of_order: list[int] = field(default_factory=list)
    last: int = 0
    newest_ts: float = 0.0  # when the newest event received was made (wall clock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, msg: Inbound) -> None:
        event = decode(msg.payload, Event)
        assert event.seq is not None
        assert event.boot_id is not None
        key = (event.boot_id, event.seq)
        if key in self.seen:
            self.duplicated.append(key)
        else:
            self.seen[key] = time.monotonic()
            if event.seq <= self.last:
                self.out_of_order.append(event.seq)
            self.last = max(self.last, event.seq)
        self.newest_ts = max(self.newest_ts, event.ts)
        self.changed.set()

    def seqs(self) -> set[int]:
        return {seq for _, seq in self.seen}

    def lost(self, upto: int) -> set[int]:
        return set(range(1, upto + 1)) - self.seqs()

    async def until(self, predicate: Any, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def node_config(tmp: Path, realm: str) -> Path:
    """A node daemon whose sensor reads /proc/uptime (a new value every 10 ms) 20
    times a second and publishes every reading."""
    path = tmp / "edge.yaml"
    data = {
        "realm": realm,
        "broker": {"reconnect": {"initial_delay": 0.1, "max_delay": 0.5}},
        "daemon": {"state_dir": str(tmp / "state"), "health_interval": 0.5},
        "nodes": {
            "sensors": {
                "type": "sensors",
                "builtin": [],
                "interval": 1 / RATE_HZ,
                "min_interval": 0,
                "heartbeat": 60,
                "sensors": [{"name": "tick", "file": "/proc/uptime", "regex": r"^(\S+)"}],
            }
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def start_node(config: Path, url: str) -> MtorProcess:
    return MtorProcess(["node", "-c", str(config), "-b", url, "-n", NODE])


def spool_rows(tmp: Path, realm: str) -> tuple[list[int], int]:
    """(seqs in the spool, the next seq it will give) as the file on disk says."""
    path = spool_path(tmp / "state", realm, NODE)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        seqs = [s for (s,) in db.execute("SELECT seq FROM events ORDER BY seq")]
        row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        return seqs, int(row[0]) if row else 1
    finally:
        db.close()


async def wait_spooled(tmp: Path, realm: str, n: int, timeout: float) -> None:
    """Until the daemon (another process) has written ``n`` events to its spool."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(sqlite3.Error):
                if len(spool_rows(tmp, realm)[0]) >= n:
                    return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def watching(url: str, realm: str) -> AsyncIterator[tuple[Tally, list[NodeHealth]]]:
    """A subscriber on the broker itself (never cut off): the node's events and health."""
    async with running_bus(make_config(url, realm)) as bus:
        tally = Tally()
        healths: list[NodeHealth] = []

        async def health(msg: Inbound) -> None:
            healths.append(decode(msg.payload, NodeHealth))

        await bus.subscribe(f"mtor/{realm}/event/{NODE}/#", tally, qos=2)
        await bus.subscribe(f"mtor/{realm}/node/{NODE}/health", health, qos=0)
        yield tally, healths


def assert_clean(tally: Tally, last: int) -> None:
    lost = tally.lost(last)
    print(
        f"events 1..{last}: lost {len(lost)}, duplicated {len(tally.duplicated)}, "
        f"out of order {len(tally.out_of_order)}"
    )
    assert not lost, f"lost: {sorted(lost)[:20]}"
    assert not tally.out_of_order, f"out of order: {tally.out_of_order[:20]}"


# Delivered events a graceful stop may leave spooled, unacknowledged (the last ones).
TAIL_IN_FLIGHT = 3


@pytest.mark.slow
async def test_a_node_cut_off_loses_nothing(own_broker: PrivateBroker, tmp_path: Path) -> None:
    """A node producing 20 events/s is cut off for CUT_S seconds, then plugged back:
    what it made meanwhile arrives after the cut, in order, once each."""
    realm = "t" + uuid.uuid4().hex[:10]
    cable = Cable(own_broker.port)
    async with cable, watching(own_broker.url, realm) as (tally, healths):
        proc = start_node(node_config(tmp_path, realm), cable.url)
        try:
            await tally.until(lambda: len(tally.seen) >= RATE_HZ)
            cable.pull()
            pulled, before = time.monotonic(), tally.last
            await asyncio.sleep(CUT_S)  # the cut itself: nothing to wait for
            cable.plug()
            plugged, plugged_wall = time.monotonic(), time.time()
            # Events made a second after the plug: everything before them came first.
            await tally.until(lambda: tally.newest_ts > plugged_wall + 1.0)
            rc, out = proc.terminate()
        finally:
            proc.close()
        assert rc == 0, out[-3000:]
        left, next_seq = spool_rows(tmp_path, realm)
        # A graceful stop waits within shutdown_timeout for acknowledgements; what was
        # delivered but not yet acknowledged stays spooled and goes out again at the
        # next start, same boot id and seq (docs/protocol.md §6.1: at least once). So
        # only the last few may be left, and only events the broker did deliver.
        received = {seq for _, seq in tally.seen}
        assert len(left) <= TAIL_IN_FLIGHT and set(left) <= received, (
            f"events still spooled: {left[:10]}; received up to {tally.last}, "
            f"{len(tally.seen)} in all\n{out[-3000:]}"
        )
        await tally.until(lambda: len(tally.seen) >= next_seq - 1)
    assert_clean(tally, next_seq - 1)
    assert not tally.duplicated, f"duplicated: {tally.duplicated[:20]}"
    assert len(tally.seen) == next_seq - 1
    assert {boot for boot, _ in tally.seen} and len({boot for boot, _ in tally.seen}) == 1
    # The spool really held them: events made during the cut arrived after it.
    held = [seq for (_, seq), got in tally.seen.items() if seq > before and got >= plugged]
    assert len(held) >= CUT_S * RATE_HZ // 2, (len(held), pulled, plugged)
    # Health tells what the spool did: nothing dropped, and it has emptied.
    spools = [h.spool for h in healths if h.spool is not None]
    assert spools, "no health with spool stats"
    assert all(s.dropped == 0 for s in spools)
    assert max(s.last_seq for s in spools) > before


@pytest.mark.slow
async def test_killed_while_cut_off_sends_its_spool_after_restart(
    own_broker: PrivateBroker, tmp_path: Path
) -> None:
    """kill -9 while cut off: what the dead daemon spooled is sent by the next one,
    before anything newer, with its old boot id; nothing lost, nothing out of order."""
    realm = "t" + uuid.uuid4().hex[:10]
    config = node_config(tmp_path, realm)
    cable = Cable(own_broker.port)
    async with cable, watching(own_broker.url, realm) as (tally, _):
        first = start_node(config, cable.url)
        try:
            await tally.until(lambda: len(tally.seen) >= RATE_HZ)
            cable.pull()
            before = tally.last
            received_before = set(tally.seen)
            await wait_spooled(tmp_path, realm, int(CUT_S * RATE_HZ // 2), timeout=CUT_S * 4 + 10)
            first.kill9()
        finally:
            first.close()
        spooled, next_seq = spool_rows(tmp_path, realm)
        assert len(spooled) >= CUT_S * RATE_HZ // 2
        assert spooled == sorted(spooled) and spooled[-1] == next_seq - 1
        old_boots = {boot for boot, _ in tally.seen}
        cable.plug()
        restarted = time.monotonic()
        second = start_node(config, own_broker.url)
        try:
            await tally.until(lambda: set(spooled) <= tally.seqs())
            await tally.until(lambda: len({boot for boot, _ in tally.seen}) >= 2)
            await tally.until(lambda: tally.last >= next_seq + RATE_HZ)
            rc, out = second.terminate()
        finally:
            second.close()
        assert rc == 0, out[-3000:]
        left, last_next = spool_rows(tmp_path, realm)
        assert left == []
        await tally.until(lambda: len(tally.seen) >= last_next - 1)
    assert_clean(tally, last_next - 1)
    # The spooled events came from the dead daemon's boot, after the restart.
    by_seq = {seq: (boot, got) for (boot, seq), got in tally.seen.items()}
    for seq in spooled:
        boot, got = by_seq[seq]
        assert boot in old_boots, seq
        if seq > before:
            assert got >= restarted, seq
    new_boot = {boot for boot, _ in tally.seen} - old_boots
    assert len(new_boot) == 1
    assert min(seq for boot, seq in tally.seen if boot in new_boot) == next_seq
    # At least once across a restart: only an event the broker had taken before the cut
    # (its acknowledgement lost with the connection) may come twice.
    print(f"duplicated across the restart: {tally.duplicated}")
    assert set(tally.duplicated) <= received_before
    assert len(tally.duplicated) <= WINDOW


async def test_a_full_spool_drops_the_oldest_and_keeps_the_seq(
    own_broker: PrivateBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """200 events into a spool of 50 while the broker is unreachable: the 150 oldest
    are dropped (counted, logged once for the burst); after a restart of the spool the
    50 newest go out in order, and the next event continues the sequence."""
    realm = "t" + uuid.uuid4().hex[:10]
    path = tmp_path / "spool.sqlite"
    topic = f"mtor/{realm}/event/{NODE}/sensor/x"
    cable = Cable(own_broker.port)
    cable.plugged = False  # the broker is away from the start
    async with cable:
        offline = Bus(make_config(cable.url, realm).broker, f"off-{realm}")
        bus_task = asyncio.create_task(offline.run())
        spool = EventSpool(path, "aaaaaaaaaaaa", max_events=50)
        await spool.open()
        spool.start(offline)
        with caplog.at_level(logging.WARNING, logger="daemon.spool"):
            for i in range(200):
                await spool.publish(topic, Event(value=i))
                if i % 20 == 0:
                    await asyncio.sleep(0.01)  # several transactions, not one
            await spool.close(timeout=0.5)
        bus_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bus_task
    stats = spool.stats()
    assert stats["dropped"] == 150, stats
    assert stats["events"] == 50
    assert stats["last_seq"] == 200
    full = [r for r in caplog.records if "event spool full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]

    async with watching(own_broker.url, realm) as (tally, _):
        online = Bus(make_config(own_broker.url, realm).broker, f"on-{realm}")
        bus_task = asyncio.create_task(online.run())
        again = EventSpool(path, "bbbbbbbbbbbb", max_events=50)
        await again.open()
        again.start(online)
        try:
            await tally.until(lambda: len(tally.seen) >= 50, timeout=10)
            assert await again.publish(topic, Event(value="new"), wait=True) == 201
            await tally.until(lambda: len(tally.seen) >= 51, timeout=10)
        finally:
            await again.close()
            bus_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bus_task
    assert [seq for _, seq in tally.seen] == [*range(151, 201), 201]
    assert {boot for boot, seq in tally.seen if seq <= 200} == {"aaaaaaaaaaaa"}
    assert not tally.duplicated
    assert not tally.out_of_order
    assert again.stats()["events"] == 0


async def test_the_byte_bound_holds(tmp_path: Path) -> None:
    """Events of ~1 KiB into a 20 KiB spool with no broker: it never holds more."""
    cfg = make_config("mqtt://127.0.0.1:9", "tbytes")  # nothing listens on the discard port
    bus = Bus(cfg.broker, "unused")
    spool = EventSpool(tmp_path / "s.sqlite", "cccccccccccc", max_bytes=20 * 1024)
    await spool.open()
    spool.start(bus)
    topic = f"mtor/tbytes/event/{NODE}/sensor/x"
    for i in range(100):
        await spool.publish(topic, Event(value=i, attrs={"pad": "x" * 1000}))
    await spool.close(timeout=0)
    stats = spool.stats()
    assert 0 < stats["bytes"] <= 20 * 1024, stats
    assert stats["events"] + stats["dropped"] == 100
    db = sqlite3.connect(tmp_path / "s.sqlite")
    seqs = [s for (s,) in db.execute("SELECT seq FROM events ORDER BY seq")]
    size = db.execute("SELECT SUM(length(topic) + length(payload)) FROM events").fetchone()[0]
    db.close()
    assert seqs == list(range(101 - len(seqs), 101))  # the newest kept
    assert size == stats["bytes"]
