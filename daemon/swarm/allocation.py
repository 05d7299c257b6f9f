"""The allocation of one round: who wins which sector, from the round's bids.

A pure function every participant computes the same way (see
:mod:`daemon.swarm.auction` on determinism).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final


def allocate(
    bids: Mapping[str, Sequence[float | None]], open_sectors: Sequence[int]
) -> dict[int, tuple[str, float]]:
    """Winner and cost of each open sector that has a bid.

    One sector per robot first: greedy by ascending ``(cost, node, sector)``, then
    improved by local search (:func:`_improve`: a sector moves to an idle bidder,
    or two robots swap, whenever that lowers the total strictly).  Sectors left
    over (more sectors than robots) go greedily to robots that have one already.
    Deterministic: the same bids give the same result on every peer, and a tie
    keeps the greedy choice, the lowest node id.
    """
    ranked = sorted(
        (cost, node, s)
        for node, costs in bids.items()
        for s in open_sectors
        if s < len(costs) and (cost := costs[s]) is not None
    )
    out: dict[int, tuple[str, float]] = {}
    first = True
    while True:
        used: set[str] = set()
        progressed = False
        for cost, node, s in ranked:
            if s in out or node in used:
                continue
            out[s] = (node, cost)
            used.add(node)
            progressed = True
        if first and len(out) > 1:
            out = _improve(bids, out)
        first = False
        if not progressed:
            return out


# Local search stops after this many improving moves (each lowers the total, so it
# ends anyway; the cap bounds the work a hostile set of bids can cause).
MAX_MOVES: Final = 10_000
_EPS: Final = 1e-9


def _improve(
    bids: Mapping[str, Sequence[float | None]], assigned: dict[int, tuple[str, float]]
) -> dict[int, tuple[str, float]]:
    """Lower the total cost of a one-sector-per-robot assignment by moving a sector
    to an idle bidder or swapping two robots' sectors, first improvement first, in
    sorted order (so every peer makes the same moves)."""
    holder = {s: node for s, (node, _) in assigned.items()}
    sectors = sorted(holder)
    nodes = sorted(bids)

    def cost(node: str, s: int) -> float | None:
        costs = bids[node]
        return costs[s] if s < len(costs) else None

    moves = 0
    improved = True
    while improved and moves < MAX_MOVES:
        improved = False
        busy = set(holder.values())
        for s in sectors:
            here = cost(holder[s], s)
            assert here is not None
            for node in nodes:
                c = cost(node, s)
                if node not in busy and c is not None and c < here - _EPS:
                    busy.discard(holder[s])
                    holder[s], here = node, c
                    busy.add(node)
                    improved, moves = True, moves + 1
        for i, s1 in enumerate(sectors):
            for s2 in sectors[i + 1 :]:
                n1, n2 = holder[s1], holder[s2]
                a, b = cost(n1, s2), cost(n2, s1)
                now1, now2 = cost(n1, s1), cost(n2, s2)
                assert now1 is not None and now2 is not None
                if a is not None and b is not None and a + b < now1 + now2 - _EPS:
                    holder[s1], holder[s2] = n2, n1
                    improved, moves = True, moves + 1
    out: dict[int, tuple[str, float]] = {}
    for s, node in holder.items():
        c = cost(node, s)
        assert c is not None
        out[s] = (node, c)
    return out
