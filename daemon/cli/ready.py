"""``mtor up``'s ready line: when the realm is up, what runs and what it offers.

Printed once: the orchestrator says it is online and every node of the daemon
has finished starting (running, or failed with its reason) — loading models
takes a while, and until then `mtor ask chat ...` waits (issue 20). Read from
the realm itself (the retained ``orchestrator/state`` and ``node/<id>/info``),
not guessed from the child processes; what an earlier run left retained there
(its last advert said "running" too) is told apart by its time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Final

from daemon import topics
from daemon.bus import Inbound
from daemon.cli.common import client_bus
from daemon.config import Config
from daemon.errors import MessageError, MtorError
from daemon.messages import decode
from daemon.protocol.admin import OrchestratorState
from daemon.protocol.node import NodeInfo

log = logging.getLogger(__name__)

# How long `mtor up` waits for the realm to be ready before it stops looking (s).
READY_WITHIN_S: Final = 300.0


def ready_line(node_id: str, info: NodeInfo, seconds: float, broker_url: str) -> str:
    caps = sorted({c.name for c in info.capabilities})
    running = [n.name for n in info.nodes if n.status == "running"]
    failed = [n for n in info.nodes if n.status == "failed"]
    line = (
        f"mtor up: ready in {seconds:.1f} s on {broker_url}: orchestrator online; "
        f"node {node_id!r} runs {', '.join(running) or 'no node'} and offers "
        f"{', '.join(caps) or 'nothing'}"
    )
    if failed:
        why = "; ".join(f"{n.name}: {(n.error or 'failed')[:120]}" for n in failed)
        line += f"\n         not running: {why}"
    return line


def settled(info: NodeInfo) -> bool:
    """Every hosted node finished starting (running, or failed for good)."""
    return bool(info.nodes) and all(n.status in ("running", "failed") for n in info.nodes)


async def announce_ready(
    config: Config, node_id: str, stop: asyncio.Event, within: float = READY_WITHIN_S
) -> None:
    started = time.monotonic()
    # What an earlier run left retained (its info said "running" too) is not this run's.
    since = time.time() - 1.0
    online = asyncio.Event()
    node: list[NodeInfo] = []
    ready = asyncio.Event()

    async def on_orchestrator(msg: Inbound) -> None:
        with contextlib.suppress(MessageError):
            state = decode(msg.payload, OrchestratorState) if msg.payload else None
            if state is not None and state.state == "online" and state.ts >= since:
                online.set()

    async def on_info(msg: Inbound) -> None:
        with contextlib.suppress(MessageError):
            info = decode(msg.payload, NodeInfo) if msg.payload else None
            if info is not None and info.ts >= since and settled(info):
                node[:] = [info]
                ready.set()

    try:
        async with client_bus(config, "up") as bus:
            await bus.subscribe(topics.ORCH_STATE.build(realm=config.realm), on_orchestrator)
            await bus.subscribe(
                topics.NODE_INFO.build(realm=config.realm, node_id=node_id), on_info
            )
            try:
                async with asyncio.timeout(within):
                    while not (online.is_set() and ready.is_set()) and not stop.is_set():
                        await _first(online, ready, stop)
            except TimeoutError:
                log.warning("the realm was not ready within %.0f s (see the lines above)", within)
                return
            if online.is_set() and node:
                line = ready_line(node_id, node[0], time.monotonic() - started, bus.config.url)
                print(line, file=sys.stderr, flush=True)
    except MtorError as exc:  # the line is a courtesy: never a reason for mtor up to stop
        log.warning("cannot say when the realm is ready: %s", exc)


async def _first(*events: asyncio.Event) -> None:
    """Until one of ``events`` that is not set yet is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events if not e.is_set()]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
