"""The auctioneer: an account that allocates the missions naming it as
``auctioneer`` (instead of ``peers``), for the orchestrator to host.

It runs the same :class:`~daemon.swarm.auction.Auction` in the ``auctioneer``
role: collects a round's bids, awards each sector (``swarm/award/<account>``),
waits for the winner's ack, follows its progress and heartbeats, and calls a new
round (``swarm/call/<account>``) when a winner fails, drops out or never
acknowledges.  Robots take awards and calls for a mission only from the account
its announce named, so one auctioneer cannot steer another's missions.

Wiring it into a service is two calls and a hook (the orchestrator's history)::

    auctioneer = Auctioneer(bus, realm, account="orchestrator", on_finished=record)
    await auctioneer.start()        # after the bus is up; subscriptions survive reconnects
    ...
    auctioneer.close()              # on shutdown (cancels its timer)

``record`` receives a :class:`MissionRecord` (issuer, mission, status, winners,
rounds, seconds) for each mission that ends.  ``mtor mission --auctioneer self``
runs one in the CLI's own process, which is how it is tested without the
orchestrator.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from daemon.bus import Bus
from daemon.protocol.swarm import MissionAnnounce
from daemon.swarm.auction import Auction, Note, Role, Timing
from daemon.swarm.service import AuctionHost

log = logging.getLogger(__name__)

# How missions appear in the orchestrator's history.
MISSION_CAPABILITY = "swarm.mission"


@dataclass(frozen=True, slots=True)
class MissionRecord:
    """One finished mission, for a history."""

    issuer: str
    mission: str
    status: str
    winners: list[list[str]]  # per sector, every holder in order (the last one finished)
    rounds: int
    seconds: float

    def history_row(self, ended: float) -> dict[str, object]:
        """The mission as a row of the orchestrator's task history (capability
        ``swarm.mission``; ``mtor history --capability swarm.mission``).  ``ended``:
        epoch seconds."""
        last = [w[-1] for w in self.winners if w]
        return {
            "task_id": f"mission:{self.issuer}/{self.mission}"[:200],
            "user": self.issuer,
            "capability": MISSION_CAPABILITY,
            "node": ",".join(last)[:200] or None,
            "priority": "interactive",
            "submitted": ended - self.seconds,
            "queue_ms": None,
            "run_ms": None,
            "total_ms": round(self.seconds * 1000, 3),
            "outcome": "done" if self.status == "done" else "failed",
            "error_code": None if self.status == "done" else self.status,
            "attempts": self.rounds,
            "input_bytes": 0,
            "output_bytes": 0,
        }


class Auctioneer(AuctionHost):
    def __init__(
        self,
        bus: Bus,
        realm: str,
        account: str,
        *,
        timing: Timing | None = None,
        on_finished: Callable[[MissionRecord], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(bus, realm, account, timing)
        self._record = on_finished
        self._opened: dict[tuple[str, str], float] = {}

    def role_for(self, issuer: str, announce: MissionAnnounce) -> Role | None:
        if announce.auctioneer != self.me:
            return None
        self._opened[(issuer, announce.mission)] = self.now()
        return "auctioneer"

    async def on_note(self, auction: Auction, note: Note) -> None:
        log.info("mission %s/%s: %s", auction.issuer, auction.mission, note.text)

    async def on_finished(self, auction: Auction) -> None:
        started = self._opened.pop((auction.issuer, auction.mission), self.now())
        record = MissionRecord(
            issuer=auction.issuer,
            mission=auction.mission,
            status=auction.finished or "failed",
            winners=[list(s.winners) for s in auction.sectors],
            rounds=auction.round,
            seconds=round(self.now() - started, 3),
        )
        log.info("mission %s/%s %s", record.issuer, record.mission, record.status)
        if self._record is not None:
            await self._record(record)
