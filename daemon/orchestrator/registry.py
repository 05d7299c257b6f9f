"""The live registry: every peer, what it offers and how it is doing.

Fed by the retained ``state`` / ``info`` and the periodic ``health`` of every
node.  A will from an older boot is ignored.  The capability index
(capability → peers) and the "has a free slot" sets are updated
incrementally, so an assignment never scans the whole realm.

Bounded against hostile input: at most ``MAX_PEERS`` peers are remembered (a
flood of made-up node ids is refused, not stored), and the index forgets a
capability name no peer offers any more.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Final

from daemon.orchestrator.breaker import Breaker
from daemon.orchestrator.config import BreakerConfig
from daemon.orchestrator.policy import Candidate
from daemon.protocol.node import Capability, NodeHealth, NodeInfo, NodeState

log = logging.getLogger(__name__)

# Weight of the newest sample in the latency and success EWMAs.
EWMA_ALPHA: Final = 0.2
# Peers remembered at most: a realm is tens or hundreds of nodes; a flood of
# made-up node ids (retained state/info on node/<random>/...) must not grow memory.
MAX_PEERS: Final = 10_000


class IndexedSet:
    """A set with O(1) add, remove and random sampling."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._pos: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self._pos:
            self._pos[item] = len(self.items)
            self.items.append(item)

    def discard(self, item: str) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self._pos[last] = i

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, k: int, rng: random.Random) -> list[str]:
        return list(self.items) if len(self.items) <= k else rng.sample(self.items, k)


@dataclass
class Slot:
    """One capability of one peer (several adverts of one name, e.g. two chat
    backends, share a slot whose capacity is their sum)."""

    caps: list[Capability]
    breaker: Breaker
    in_use: int = 0
    latency_ms: float | None = None
    success: float = 1.0
    completed: int = 0
    failed: int = 0
    capacity: int = field(init=False, default=0)  # read on every assignment: kept, not summed

    def __post_init__(self) -> None:
        self.set_caps(self.caps)

    def set_caps(self, caps: list[Capability]) -> None:
        self.caps = caps
        self.capacity = sum(c.max_concurrency for c in caps)

    def offers(self, backend: str | None, model: str | None, language: str | None) -> bool:
        return any(
            (backend is None or c.backend == backend)
            and (model is None or c.model == model)
            and (language is None or not c.languages or language in c.languages)
            for c in self.caps
        )

    def record(self, ok: bool, run_ms: float | None) -> None:
        self.success += EWMA_ALPHA * ((1.0 if ok else 0.0) - self.success)
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        if run_ms is not None and ok:
            self.latency_ms = (
                run_ms
                if self.latency_ms is None
                else self.latency_ms + EWMA_ALPHA * (run_ms - self.latency_ms)
            )


@dataclass
class Peer:
    node_id: str
    boot_id: str | None = None
    online: bool = False
    stale: bool = False
    last_seen: float = 0.0
    drained: bool = False
    blacklisted: bool = False
    info: NodeInfo | None = None
    health: NodeHealth | None = None
    slots: dict[str, Slot] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.online and not self.stale and not self.drained and not self.blacklisted

    @property
    def load_per_core(self) -> float:
        if self.health is None or self.health.load is None or self.info is None:
            return 0.0
        return self.health.load[0] / max(1, self.info.hardware.cpu_count)

    @property
    def has_accelerator(self) -> bool:
        return bool(self.info and self.info.hardware.accelerators)

    def candidate(self, name: str, *, local: bool = False) -> Candidate:
        """This peer as the assignment policy sees it for capability ``name``."""
        slot = self.slots[name]
        return Candidate(
            node_id=self.node_id,
            in_use=slot.in_use,
            capacity=slot.capacity,
            load_per_core=self.load_per_core,
            latency_ms=slot.latency_ms,
            success=slot.success,
            local=local,
            probation=slot.breaker.probation,
        )


class Registry:
    def __init__(self, breaker: BreakerConfig) -> None:
        self.breaker_config = breaker
        self.peers: dict[str, Peer] = {}
        self.index: dict[str, set[str]] = {}
        self.free: dict[str, IndexedSet] = {}
        self.refused = 0  # messages of new peers past MAX_PEERS

    def peer(self, node_id: str) -> Peer:
        p = self.peers.get(node_id)
        if p is None:
            p = self.peers[node_id] = Peer(node_id)
        return p

    def _known(self, node_id: str) -> Peer | None:
        """The peer a message is about.  A new one past ``MAX_PEERS`` takes the place
        of a gone peer with nothing running (and no sysop flag); if there is none, the
        message is ignored (None, counted and logged)."""
        p = self.peers.get(node_id)
        if p is not None:
            return p
        if len(self.peers) < MAX_PEERS or self._evict():
            return self.peer(node_id)
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning(
                "%d peers known already: message of new peer %r ignored (%d so far)",
                len(self.peers),
                node_id[:100],
                self.refused,
            )
        return None

    @staticmethod
    def _forgettable(p: Peer) -> bool:
        """Gone, running nothing, and carrying no sysop flag (drained, blacklisted)."""
        return (
            (not p.online or p.stale)
            and not p.drained
            and not p.blacklisted
            and not any(s.in_use for s in p.slots.values())
        )

    def _drop(self, p: Peer) -> None:
        self._set_slots(p, [])
        del self.peers[p.node_id]

    def _evict(self) -> bool:
        """Forget the oldest peer that is gone, runs nothing and carries no sysop flag."""
        for p in self.peers.values():
            if self._forgettable(p):
                self._drop(p)
                return True
        return False

    def forget(self, now: float, after: float) -> list[str]:
        """Forget peers gone (offline or silent) for longer than ``after`` seconds;
        returns their ids.  A peer that comes back is learnt again from its birth."""
        old = [p for p in self.peers.values() if self._forgettable(p) and now - p.last_seen > after]
        for p in old:
            self._drop(p)
        return [p.node_id for p in old]

    # ----------------------------------------------------------- messages

    def on_state(self, node_id: str, state: NodeState, now: float) -> bool:
        """Apply a birth or will.  Returns True when the peer just went away."""
        p = self._known(node_id)
        if p is None:
            return False
        if state.state == "offline":
            if p.boot_id is not None and state.boot_id != p.boot_id:
                return False  # the will of an older boot: the peer is already back
            was = p.online
            p.online = False
            self._refresh_all(p)
            return was
        if state.boot_id != p.boot_id:
            # A new boot: forget the old adverts until the new info arrives.
            self._set_slots(p, [])
            p.info = None
            p.boot_id = state.boot_id
        p.online = True
        p.stale = False
        p.last_seen = now
        self._refresh_all(p)
        return False

    def on_info(self, node_id: str, info: NodeInfo, now: float) -> None:
        p = self._known(node_id)
        if p is None:
            return
        if p.boot_id is not None and info.boot_id != p.boot_id:
            if p.online:
                return  # an advert of an older boot
            p.boot_id = info.boot_id
        p.info = info
        p.last_seen = now
        self._set_slots(p, info.capabilities)

    def on_health(self, node_id: str, health: NodeHealth, now: float) -> None:
        p = self._known(node_id)
        if p is None or (p.boot_id is not None and health.boot_id != p.boot_id):
            return
        p.health = health
        self.seen(node_id, now)

    def seen(self, node_id: str, now: float) -> None:
        p = self.peers.get(node_id)
        if p is None:
            return
        p.last_seen = now
        if p.stale:
            p.stale = False
            self._refresh_all(p)

    def sweep(self, now: float, stale_after: float) -> list[str]:
        """Mark silent peers stale; returns the ids that just went stale."""
        gone = []
        for p in self.peers.values():
            if p.online and not p.stale and now - p.last_seen > stale_after:
                p.stale = True
                self._refresh_all(p)
                gone.append(p.node_id)
        return gone

    # -------------------------------------------------------------- slots

    def _set_slots(self, p: Peer, caps: list[Capability]) -> None:
        grouped: dict[str, list[Capability]] = {}
        for cap in caps:
            grouped.setdefault(cap.name, []).append(cap)
        new: dict[str, Slot] = {}
        for name, group in grouped.items():
            old = p.slots.get(name)
            if old is not None:
                old.set_caps(group)
                new[name] = old
            else:
                new[name] = Slot(group, Breaker(self.breaker_config))
        for name in set(p.slots) - set(new):
            offering = self.index.get(name)
            if offering is not None:
                offering.discard(p.node_id)
            free = self.free.get(name)
            if free is not None:
                free.discard(p.node_id)
            if not offering:  # nobody offers it any more: forget the name
                self.index.pop(name, None)
                if free is not None and not free:
                    del self.free[name]
        p.slots = new
        for name in new:
            self.index.setdefault(name, set()).add(p.node_id)
        self._refresh_all(p)

    def _refresh(self, p: Peer, name: str, now: float = 0.0) -> None:
        """Recompute whether the peer can take another ``name`` task right now."""
        slot = p.slots.get(name)
        free = self.free.get(name)
        if free is None:
            free = self.free[name] = IndexedSet()
        if (
            slot is not None
            and p.available
            and slot.in_use < slot.capacity
            and (slot.breaker.state == "closed" or slot.breaker.allows(now))
        ):
            free.add(p.node_id)
        else:
            free.discard(p.node_id)

    def _refresh_all(self, p: Peer, now: float = 0.0) -> None:
        for name in p.slots:
            self._refresh(p, name, now)

    def reopen_breakers(self, now: float) -> None:
        """Put peers whose cool-down ended back into the free sets (half-open)."""
        for p in self.peers.values():
            for name, slot in p.slots.items():
                if slot.breaker.state == "open" and now >= slot.breaker.open_until:
                    self._refresh(p, name, now)

    # --------------------------------------------------- slots in use, outcomes
    # Every change that decides whether a peer is free goes through these: the
    # free sets are kept by the registry, never by its callers.

    def usable(self, p: Peer, name: str, now: float) -> bool:
        """May ``p`` be given a ``name`` task now (its breaker allows it)?  A peer
        whose breaker says no leaves the free set."""
        if p.slots[name].breaker.allows(now):
            return True
        self._refresh(p, name, now)
        return False

    def take(self, p: Peer, name: str) -> None:
        """A ``name`` task was assigned to ``p``: one slot more in use."""
        slot = p.slots[name]
        slot.in_use += 1
        slot.breaker.on_assign()
        self._refresh(p, name)

    def give_back(self, node_id: str, name: str, now: float) -> None:
        """A ``name`` task of ``node_id`` ended or was taken back: its slot is free."""
        p = self.peers.get(node_id)
        if p is None:
            return
        slot = p.slots.get(name)
        if slot is not None:
            slot.in_use = max(0, slot.in_use - 1)
            slot.breaker.probing = False
        self._refresh(p, name, now)

    def outcome(
        self, node_id: str, name: str, ok: bool, now: float, run_ms: float | None = None
    ) -> None:
        """Record how a ``name`` task went on ``node_id`` (latency, success, breaker)."""
        p = self.peers.get(node_id)
        slot = p.slots.get(name) if p is not None else None
        if p is None or slot is None:
            return
        slot.record(ok, run_ms)
        if ok:
            closed = slot.breaker.state == "closed"
            slot.breaker.on_success()
            if closed:
                return  # nothing that decides whether the peer is free has changed
        else:
            was = slot.breaker.state
            slot.breaker.on_failure(now)
            if slot.breaker.state == "open" and was != "open":
                log.warning(
                    "blacklisted %s for %s for %.0fs (trip %d)",
                    node_id,
                    name,
                    slot.breaker.open_until - now,
                    slot.breaker.trips,
                )
        self._refresh(p, name, now)

    def set_flags(
        self, node_id: str, *, drained: bool | None = None, blacklisted: bool | None = None
    ) -> Peer | None:
        """A sysop's drain / blacklist of a peer (None: unchanged); the peer, or None
        when unknown."""
        p = self.peers.get(node_id)
        if p is None:
            return None
        if drained is not None:
            p.drained = drained
        if blacklisted is not None:
            p.blacklisted = blacklisted
        self._refresh_all(p)
        return p

    def offered(self, name: str) -> bool:
        return bool(self.index.get(name))

    def capable_online(self, name: str) -> bool:
        return any(self.peers[n].available for n in self.index.get(name, ()))
