"""The contract-net auction of one mission, as one participant sees it: a pure state
machine fed with messages and a clock, returning actions (sans-IO: no bus, no timers).

Every participant runs the same machine over the same messages:

* ``peer`` — a robot in a peer-run auction (``auctioneer: peers``): it bids, and at
  the close of a round computes the allocation itself; where it is the winner it
  *claims* the sector (an :class:`Award` from itself), waits :attr:`Timing.settle_s`
  for a better claim, then acknowledges and starts;
* ``bidder`` — a robot when an auctioneer runs the auction: it bids, and starts
  what the auctioneer awards it;
* ``auctioneer`` — the account that allocates (the orchestrator, or the CLI);
* ``watcher`` — follows the auction and reports (``mtor mission``, benchmarks).

Determinism: the allocation (:func:`allocate`) is a pure function of the bids of
a round: lowest cost first, ties broken by node id then sector (string order), at
most one sector per robot while robots last.  Peers that saw the same bids agree
on every winner; peers that saw different bids (a late bid) may both claim, and
then the better claim by the same order wins everywhere: the other yields before
it acknowledges.  So exactly one robot acknowledges a sector, provided a claim
reaches every peer within ``settle_s``.

Re-auction: a winner that fails (its progress says so), drops out (its will, or
:attr:`Timing.misses` missed heartbeats) or never acknowledges reopens its
sectors in the next round; a robot that failed or went silent on a mission is
left out of that mission's later rounds.
"""

from __future__ import annotations

from typing import Final, Literal

from daemon.protocol.swarm import (
    PEERS,
    Award,
    Bid,
    MissionAck,
    MissionAnnounce,
    MissionCall,
    MissionProgress,
)
from daemon.swarm.actions import (
    Abandon,
    Action,
    Bidder,
    Finished,
    Note,
    Reject,
    SendAck,
    SendAward,
    SendBid,
    SendCall,
    Start,
    Timing,
)
from daemon.swarm.allocation import allocate
from daemon.swarm.sectors import Fleet, SectorPhase, SectorState

__all__ = [  # what the swarm's hosts and tests take from here (defined beside it)
    "Abandon",
    "Action",
    "Auction",
    "Bidder",
    "Finished",
    "Fleet",
    "Note",
    "Reject",
    "Role",
    "SectorPhase",
    "SectorState",
    "SendAck",
    "SendAward",
    "SendBid",
    "SendCall",
    "Start",
    "Timing",
    "allocate",
]

Role = Literal["peer", "bidder", "auctioneer", "watcher"]

# Rounds before a mission gives up: each round loses a robot, so a realm with more
# robots than this that all fail one mission has a problem bidding will not solve.
MAX_ROUNDS: Final = 20


class Auction:
    """One mission's auction from one participant's point of view."""

    def __init__(
        self,
        issuer: str,
        announce: MissionAnnounce,
        *,
        role: Role,
        me: str | None = None,
        bidder: Bidder | None = None,
        fleet: Fleet | None = None,
        timing: Timing | None = None,
    ) -> None:
        self.issuer = issuer
        self.announce = announce
        self.role: Role = role
        self.me = me
        self.bidder = bidder
        self.fleet = fleet or Fleet()
        self.timing = timing or Timing()
        self.peer_run = announce.auctioneer == PEERS
        self.round = 0
        self.bids: dict[str, list[float | None]] = {}
        self.excluded: set[str] = set()
        self.close_at: float | None = None
        self.sectors = [SectorState() for _ in range(announce.sectors)]
        self.finished: Literal["done", "failed"] | None = None
        self.rounds_opened_at: dict[int, float] = {}
        self.extended = False  # this round's bid window was extended once (no bids)
        self._untaken: list[int] = []  # sectors given up on: no bid, no claim

    @property
    def mission(self) -> str:
        return self.announce.mission

    # ------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """The announce arrived: round 1 opens."""
        return self._open_round(1, now, "announced")

    def on_bid(self, sender: str, bid: Bid, now: float) -> list[Action]:
        if len(bid.costs) != len(self.sectors):
            return [
                Reject(
                    f"bid of {sender} has {len(bid.costs)} costs for {len(self.sectors)}",
                    hostile=True,
                )
            ]
        out: list[Action] = []
        if bid.round == self.round + 1 and self.peer_run and self.round >= 1:
            # A peer saw a reason for a new round first; the reason reaches us too.
            out += self._open_round(bid.round, now, f"{sender} bid in round {bid.round}")
        if bid.round != self.round:
            return [*out, Reject(f"bid of {sender} for round {bid.round}, not {self.round}")]
        if sender in self.excluded:
            return [*out, Reject(f"{sender} is out of this mission")]
        self.bids[sender] = list(bid.costs)
        return out

    def on_call(self, sender: str, call: MissionCall, now: float) -> list[Action]:
        if self.peer_run or sender != self.announce.auctioneer:
            return [Reject(f"call from {sender}, not the auctioneer", hostile=True)]
        if call.round <= self.round:
            return []
        self._reopen_lost(now)
        return self._open_round(call.round, now, call.reason or "called")

    def on_award(self, sender: str, award: Award, now: float) -> list[Action]:
        if award.sector >= len(self.sectors):
            return [Reject(f"award of sector {award.sector} of {len(self.sectors)}", hostile=True)]
        if self.peer_run and sender != award.winner:
            return [Reject(f"{sender} claimed a sector for {award.winner}", hostile=True)]
        if not self.peer_run and sender != self.announce.auctioneer:
            return [Reject(f"award from {sender}, not the auctioneer", hostile=True)]
        if award.round > self.round:
            return [Reject(f"award for round {award.round}, we are at {self.round}")]
        sec = self.sectors[award.sector]
        # A claim of the round whose sector someone already acknowledged still
        # counts: when it is the better one, the other robot started too early.
        late = self.peer_run and sec.phase == "held" and award.round == sec.round
        if (sec.phase not in ("open", "claimed") and not late) or award.winner in self.excluded:
            return [Reject(f"award of sector {award.sector} to {award.winner}: it is {sec.phase}")]
        if self.peer_run:
            return self._claim(sec, award, now)
        out: list[Action] = [
            Note(f"sector {award.sector} awarded to {award.winner}", "awarded", award.sector)
        ]
        self._hold(sec, award.winner, award.cost, award.round, now, phase="claimed")
        if award.winner == self.me and self.role == "bidder":
            sec.phase, sec.started, sec.deadline = "held", True, None
            out += [SendAck(award.round, award.sector), Start(award.round, award.sector)]
        return out

    def on_ack(self, sender: str, ack: MissionAck, now: float) -> list[Action]:
        if ack.sector >= len(self.sectors):
            return [Reject(f"ack of sector {ack.sector} of {len(self.sectors)}", hostile=True)]
        sec = self.sectors[ack.sector]
        if sec.phase == "held" and sec.holder == sender:
            return []  # our own, or a duplicate
        if sec.phase == "claimed" and sec.holder == sender:
            sec.phase, sec.deadline, sec.since = "held", None, now
            return [Note(f"sector {ack.sector} acknowledged by {sender}", "acked", ack.sector)]
        if sec.phase == "open" and ack.round <= self.round and sender not in self.excluded:
            # A late ack of a holder whose round we had given up on: it works on it.
            self._hold(sec, sender, sec.cost or 0.0, ack.round, now, phase="held")
            return [Note(f"sector {ack.sector} acknowledged late by {sender}", "acked", ack.sector)]
        if (
            sec.phase in ("claimed", "held")
            and ack.round < sec.round
            and sender not in self.excluded
        ):
            # Views parted (a peer gave up on a round whose ack was on its way): the
            # robot that acknowledged the earlier round keeps the sector everywhere.
            out: list[Action] = []
            if sec.holder == self.me and sec.started:
                sec.started = False
                out.append(Abandon(ack.sector, f"{sender} acknowledged it in round {ack.round}"))
            self._hold(sec, sender, sec.cost or 0.0, ack.round, now, phase="held")
            text = f"sector {ack.sector} acknowledged by {sender} (round {ack.round})"
            return [*out, Note(text, "acked", ack.sector)]
        return [Reject(f"ack of {sender} for sector {ack.sector}: {sec.phase} by {sec.holder}")]

    def on_progress(self, sender: str, p: MissionProgress, now: float) -> list[Action]:
        if p.sector >= len(self.sectors):
            return [Reject(f"progress of sector {p.sector} of {len(self.sectors)}", hostile=True)]
        sec = self.sectors[p.sector]
        if sec.holder != sender or sec.phase not in ("claimed", "held"):
            return [
                Reject(
                    f"progress from {sender}, who does not hold sector {p.sector}",
                    hostile=True,
                    kind="progress of a sector not held",
                )
            ]
        sec.since = max(sec.since, now)
        if p.status in ("en_route", "working"):
            sec.phase, sec.deadline = "held", None
            sec.fraction = p.fraction
            return []
        if p.status == "done":
            sec.phase, sec.fraction, sec.deadline = "done", 1.0, None
            return [
                Note(f"sector {p.sector} done by {sender}", "done", p.sector),
                *self._maybe_finished(),
            ]
        self.excluded.add(sender)
        self._reopen(sec)
        return [
            Note(f"sector {p.sector} failed on {sender}: {p.detail or '-'}", "failed", p.sector),
            *self._next_round(now, f"{sender} failed"),
        ]

    def on_lost(self, node: str, now: float) -> list[Action]:
        """``node`` went offline (its will)."""
        self.fleet.gone(node)
        return self.tick(now)

    def tick(self, now: float) -> list[Action]:
        """Timers: the round's close, settling claims, award/ack timeouts, heartbeats."""
        out: list[Action] = []
        if self.finished:
            return out
        # Losses first: a sector whose holder is gone is allocated in the closing round.
        reasons = self._reopen_lost(now)
        if reasons:
            out += [Note(r, "reopened") for r in reasons]
            out += self._next_round(now, reasons[0])
        if self._untaken:
            out += [Note(f"sector {i}: no robot took it", "no_bid", i) for i in self._untaken]
            self._untaken = []
            out += self._maybe_finished()
        if self.close_at is not None and now >= self.close_at:
            self.close_at = None
            out += self._close(now)
        for i, sec in enumerate(self.sectors):
            if sec.settle_at is not None and now >= sec.settle_at:
                sec.settle_at = None
                if sec.phase == "claimed" and sec.holder == self.me:
                    sec.phase, sec.started, sec.deadline, sec.since = "held", True, None, now
                    out += [SendAck(sec.round, i), Start(sec.round, i)]
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do next (heartbeat checks aside)."""
        if self.finished:
            return None
        times = [self.close_at] if self.close_at is not None else []
        for sec in self.sectors:
            times += [t for t in (sec.settle_at, sec.deadline) if t is not None]
        return min(times, default=None)

    def holders(self) -> set[str]:
        return {s.holder for s in self.sectors if s.holder and s.phase in ("claimed", "held")}

    # ------------------------------------------------------------ internals

    def _open_round(self, r: int, now: float, reason: str) -> list[Action]:
        if r > MAX_ROUNDS:
            for sec in self.sectors:
                if sec.phase == "open":
                    sec.phase = "failed"
            return [Note(f"no winner after {MAX_ROUNDS} rounds"), *self._maybe_finished()]
        self.round = r
        self.bids = {}
        self.extended = False
        self.rounds_opened_at[r] = now
        self.close_at = now + self.announce.bid_window_s
        for sec in self.sectors:
            if sec.phase == "open" and sec.expected is None:  # up for allocation now
                sec.open_round, sec.claims, sec.deadline = r, {}, None
        out: list[Action] = [Note(f"round {r}: {reason}", "round")]
        if self.role == "auctioneer" and r > 1:
            out.append(SendCall(r, reason))
        out += self._my_bid()
        return out

    def _my_bid(self) -> list[Action]:
        if self.role not in ("peer", "bidder") or self.bidder is None or self.me is None:
            return []
        if self.me in self.excluded or self.close_at is None:
            return []
        costs = self.bidder(self.announce, self.round)
        if costs is None:
            return []
        self.bids[self.me] = costs
        return [SendBid(self.round, costs)]

    def _close(self, now: float) -> list[Action]:
        open_ = [
            i
            for i, s in enumerate(self.sectors)
            if s.phase == "open" and s.open_round == self.round and s.expected is None
        ]
        if not open_:
            return []
        # A bidder whose will came during the round is not a candidate (it would
        # never claim, and the sector would wait out the award timeout).
        gone = self.excluded | self.fleet.offline
        bids = {n: c for n, c in self.bids.items() if n not in gone}
        if not bids and not self.extended:
            # Nothing yet: on a busy machine the bids may still be on their way.
            self.extended = True
            self.close_at = now + self.announce.bid_window_s
            return [Note(f"round {self.round}: no bid yet, taking bids a while longer", "info")]
        won = allocate(bids, open_)
        out: list[Action] = []
        for i in open_:
            sec = self.sectors[i]
            if i not in won:
                if self.role in ("watcher", "peer"):
                    # We saw no bid for it; others may have (a busy machine): a claim
                    # may still come.  If none does, every peer fails it the same way.
                    sec.deadline = now + self.timing.award_timeout_s
                elif self.role == "auctioneer":
                    sec.phase = "failed"
                    out.append(Note(f"sector {i}: no robot bid in round {self.round}", "no_bid", i))
                continue
            node, cost = won[i]
            deadline = now + self.timing.award_timeout_s
            if self.role == "auctioneer":
                award = Award(
                    issuer=self.issuer,
                    mission=self.mission,
                    round=self.round,
                    sector=i,
                    winner=node,
                    cost=cost,
                )
                self._hold(sec, node, cost, self.round, now, phase="claimed")
                out += [
                    SendAward(award),
                    Note(f"sector {i} awarded to {node} ({cost:.1f})", "awarded", i),
                ]
            elif self.peer_run:
                sec.expected, sec.deadline, sec.cost = node, deadline, cost
                if node == self.me and self.role == "peer":
                    award = Award(
                        issuer=self.issuer,
                        mission=self.mission,
                        round=self.round,
                        sector=i,
                        winner=node,
                        cost=cost,
                    )
                    out += [SendAward(award), *self._claim(sec, award, now)]
            else:
                sec.expected, sec.deadline = node, deadline  # the auctioneer's award is due
        return [*out, *self._maybe_finished()]

    def _claim(self, sec: SectorState, award: Award, now: float) -> list[Action]:
        """A peer-run claim: the best claim of the round by (cost, node) holds."""
        if award.round != sec.open_round:
            why = f"claim of {award.winner} for round {award.round}, not {sec.open_round}"
            return [Reject(why)]
        if sec.claims.get(award.winner) == award.cost:
            return []  # a duplicate (our own claim coming back)
        diverged = self._diverged(award, now)
        sec.claims[award.winner] = award.cost
        best_cost, best = min((c, n) for n, c in sec.claims.items())
        if sec.holder == best and sec.phase == "claimed":
            return diverged
        out: list[Action] = diverged
        previous = sec.holder if sec.phase in ("claimed", "held") else None
        if sec.phase == "held" and best == previous:
            return []  # the holder's claim was and is the best
        started = sec.started and previous == self.me
        self._hold(sec, best, best_cost, award.round, now, phase="claimed")
        sec.settle_at = now + self.timing.settle_s if best == self.me else None
        if previous == self.me and best != self.me:
            out.append(Note(f"sector {award.sector}: {self.me} yields to {best}"))
            if started:  # our settle passed before this claim came: drop the work
                sec.started = False
                out.append(Abandon(award.sector, f"{best} has the better claim"))
        out.append(
            Note(
                f"sector {award.sector} claimed by {best} ({best_cost:.1f})",
                "claimed",
                award.sector,
            )
        )
        return out

    def _diverged(self, award: Award, now: float) -> list[Action]:
        """``award.winner`` claims a sector we expected another robot to take: it saw
        other bids than we did, and will not claim the sectors we expected of it.
        Reopen those now rather than wait out the award timeout."""
        mine = self.sectors[award.sector]
        if mine.expected in (None, award.winner) and mine.phase == "open":
            return []  # as we computed it
        if mine.phase != "open":
            return []
        reasons = []
        for i, sec in enumerate(self.sectors):
            if (
                i != award.sector
                and sec.phase == "open"
                and sec.expected == award.winner
                and sec.open_round == award.round
            ):
                reasons.append(f"sector {i}: {award.winner} took sector {award.sector} instead")
                self._reopen(sec)
        if not reasons:
            return []
        return [*(Note(r, "reopened") for r in reasons), *self._next_round(now, reasons[0])]

    def _hold(
        self, sec: SectorState, node: str, cost: float, r: int, now: float, *, phase: SectorPhase
    ) -> None:
        sec.phase, sec.holder, sec.cost, sec.round, sec.since = phase, node, cost, r, now
        sec.expected = None
        sec.deadline = now + self.timing.award_timeout_s if phase == "claimed" else None
        if not sec.winners or sec.winners[-1] != node:
            sec.winners.append(node)

    def _reopen(self, sec: SectorState) -> None:
        sec.phase, sec.holder, sec.deadline, sec.settle_at = "open", None, None, None
        sec.expected, sec.fraction, sec.claims = None, 0.0, {}
        if self.close_at is not None:  # a round is taking bids: it allocates this one too
            sec.open_round = self.round

    def _reopen_lost(self, now: float) -> list[str]:
        """Reopen the sectors whose holder (or expected claimant) is gone; why."""
        reasons: list[str] = []
        misses = self.timing.misses
        for i, sec in enumerate(self.sectors):
            if sec.phase in ("claimed", "held") and sec.holder is not None:
                node = sec.holder
                silent = sec.deadline is not None and now >= sec.deadline
                if silent or self.fleet.lost(node, now, sec.since, misses):
                    why = "did not acknowledge" if silent else "dropped out"
                    if silent and not self.peer_run:  # the auctioneer's award was plain
                        self.excluded.add(node)
                    reasons.append(f"sector {i}: {node} {why}")
                    self._reopen(sec)
            elif sec.phase == "open" and sec.expected is None and sec.deadline is not None:
                if now >= sec.deadline:  # we saw no bid, and no claim came
                    sec.phase, sec.deadline = "failed", None
                    self._untaken.append(i)
            elif (
                sec.phase == "open"
                and sec.expected is not None
                and sec.deadline is not None
                and (now >= sec.deadline or sec.expected in self.fleet.offline)
            ):
                if self.peer_run:
                    # Not left out: it may be alive and have seen other bids (then it
                    # claimed another sector); a dead one sends no bid next round.
                    reasons.append(f"sector {i}: {sec.expected} never claimed it")
                else:  # the auctioneer is late or not running: not the robot's fault
                    reasons.append(f"sector {i}: no award from {self.announce.auctioneer}")
                self._reopen(sec)
        return reasons

    def _next_round(self, now: float, reason: str) -> list[Action]:
        if self.role == "bidder" or (self.role == "watcher" and not self.peer_run):
            return []  # the auctioneer calls the next round
        if self.close_at is not None:
            return self._my_bid()  # a round is open: it will allocate these too
        return self._open_round(self.round + 1, now, reason)

    def _maybe_finished(self) -> list[Action]:
        if self.finished or any(s.phase not in ("done", "failed") for s in self.sectors):
            return []
        self.finished = "done" if all(s.phase == "done" for s in self.sectors) else "failed"
        return [Finished(self.finished)]
