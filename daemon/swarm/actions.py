"""What an :class:`~daemon.swarm.auction.Auction` asks its host to do (sans-IO
actions: send a bid, a call, an award, an ack; start or abandon a sector; a note
or a refusal to log; the mission finished) and its timing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from daemon.protocol.swarm import Award, MissionAnnounce


@dataclass(frozen=True, slots=True)
class Timing:
    """The auction's clocks (seconds).  Tests shrink them."""

    # A peer's claim waits this long for a better one before it acknowledges: more
    # than a broker round trip, so that a conflicting claim has arrived.
    settle_s: float = 0.15
    # An expected claim or award, then its acknowledgement, must come within this
    # after the round closed; else the winner is taken as gone.
    award_timeout_s: float = 1.0
    # A holder whose state heartbeat is this many periods late has dropped out.
    misses: int = 3


# ------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class SendBid:
    round: int
    costs: list[float | None]


@dataclass(frozen=True, slots=True)
class SendCall:
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendAward:
    award: Award


@dataclass(frozen=True, slots=True)
class SendAck:
    round: int
    sector: int


@dataclass(frozen=True, slots=True)
class Start:
    """This robot takes the sector on (after its ack)."""

    round: int
    sector: int


@dataclass(frozen=True, slots=True)
class Abandon:
    """This robot must drop a sector it started (another's ack settled it)."""

    sector: int
    reason: str


@dataclass(frozen=True, slots=True)
class Reject:
    """A message ignored, and why: one log line (a warning when ``hostile``: it
    could not come from an honest participant; else a race, at debug)."""

    reason: str
    hostile: bool = False
    kind: str = ""  # what was refused, without who: one warning per mission and kind


@dataclass(frozen=True, slots=True)
class Note:
    """Something a watcher reports: ``kind`` is round, claimed, awarded, acked,
    done, failed, reopened, no_bid or info; ``sector`` where it is about one."""

    text: str
    kind: str = "info"
    sector: int | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    status: Literal["done", "failed"]


Action = SendBid | SendCall | SendAward | SendAck | Start | Abandon | Reject | Note | Finished

# A robot's bid for a mission: one cost per sector, or None (no bid).
Bidder = Callable[[MissionAnnounce, int], list[float | None] | None]
