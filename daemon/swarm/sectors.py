"""What an auction remembers: each sector's state, and when each robot was heard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SectorPhase = Literal["open", "claimed", "held", "done", "failed"]


class Fleet:
    """When each robot was last heard (its state heartbeat) and who went offline."""

    def __init__(self) -> None:
        self.heard_at: dict[str, tuple[float, float]] = {}  # node -> (time, heartbeat_s)
        self.offline: set[str] = set()

    def heard(self, node: str, heartbeat_s: float, now: float) -> None:
        self.heard_at[node] = (now, heartbeat_s)
        self.offline.discard(node)

    def gone(self, node: str) -> None:
        self.offline.add(node)

    def lost(self, node: str, now: float, since: float, misses: int) -> bool:
        """Offline, or silent for ``misses`` heartbeats (counted from ``since`` at
        the earliest: when it took its sector on)."""
        if node in self.offline:
            return True
        seen = self.heard_at.get(node)
        if seen is None:
            return False  # never heard a heartbeat: only its will tells
        return now - max(seen[0], since) > misses * seen[1]


@dataclass(slots=True)
class SectorState:
    phase: SectorPhase = "open"
    holder: str | None = None  # claimant / awardee, then the acknowledged holder
    cost: float | None = None
    round: int = 0  # the round its holder won
    since: float = 0.0  # when the holder took it (heartbeats are counted from here)
    deadline: float | None = None  # by when the expected claim / ack must come
    expected: str | None = None  # the computed winner, not yet claimed (peer-run)
    # The round it is (or was last) allocated in.  Rounds are the mission's, but a
    # new round for one sector leaves the others' claims of their round valid.
    open_round: int = 1
    claims: dict[str, float] = field(default_factory=dict)  # peer-run: this round's
    settle_at: float | None = None  # my own claim acknowledges then
    started: bool = False  # this robot started it
    fraction: float = 0.0
    winners: list[str] = field(default_factory=list)  # every holder so far
