"""Following missions from the outside: what ``mtor mission`` and the benchmarks see.

:class:`Watcher` runs every mission's auction in the ``watcher`` role and keeps,
per mission, a timeline of what happened and when (loop clock): each round, each
claim or award, each ack, each re-opened sector, the end.  :func:`announce`
publishes a mission as the bus's account.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from daemon import topics
from daemon.bus import Bus
from daemon.protocol.swarm import MissionAnnounce, RobotState
from daemon.swarm.auction import Auction, Note, Role, Timing
from daemon.swarm.service import AuctionHost, Key


@dataclass(slots=True)
class Watched:
    """What one watched mission did."""

    announced_at: float | None = None
    timeline: list[tuple[float, str]] = field(default_factory=list)
    acked_at: dict[int, list[float]] = field(default_factory=dict)  # sector -> times
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Watcher(AuctionHost):
    def __init__(
        self, bus: Bus, realm: str, me: str = "watcher", timing: Timing | None = None
    ) -> None:
        super().__init__(bus, realm, me, timing)
        self.watched: dict[Key, Watched] = {}
        self.robot_seen = asyncio.Event()  # set on every robot state (cleared by waiters)

    def get(self, issuer: str, mission: str) -> Watched:
        return self.watched.setdefault((issuer, mission), Watched())

    def role_for(self, issuer: str, announce: MissionAnnounce) -> Role | None:
        w = self.get(issuer, announce.mission)
        if w.announced_at is None:
            w.announced_at = self.now()
        return "watcher"

    async def on_note(self, auction: Auction, note: Note) -> None:
        w = self.get(auction.issuer, auction.mission)
        now = self.now()
        w.timeline.append((now, note.text))
        if note.kind == "acked" and note.sector is not None:
            w.acked_at.setdefault(note.sector, []).append(now)
        w.changed.set()

    async def on_finished(self, auction: Auction) -> None:
        w = self.get(auction.issuer, auction.mission)
        w.timeline.append((self.now(), f"mission {auction.finished}"))
        w.finished.set()
        w.changed.set()

    async def on_robot(self, sender: str, state: RobotState) -> None:
        self.robot_seen.set()

    def auction(self, issuer: str, mission: str) -> Auction | None:
        return self.auctions.get((issuer, mission))


async def announce(bus: Bus, realm: str, issuer: str, mission: MissionAnnounce) -> None:
    """Publish ``mission`` on ``swarm/mission/<issuer>`` (QoS 1, acknowledged)."""
    topic = topics.SWARM_MISSION.build(realm=realm, sender=issuer)
    await bus.publish(topic, mission, qos=1, wait=True)
