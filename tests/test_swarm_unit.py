"""The swarm's pure parts: messages, geometry, bid costs, allocation and the auction
state machine (tie-break, concurrent claims, re-auction), without a broker."""

from __future__ import annotations

import pytest

from daemon.errors import MessageError
from daemon.messages import decode, encode
from daemon.protocol.swarm import (
    Area,
    Award,
    Bid,
    MissionAck,
    MissionAnnounce,
    MissionProgress,
    Point,
    Requirements,
    RobotProfile,
)
from daemon.swarm.auction import (
    Action,
    Auction,
    Finished,
    Fleet,
    Reject,
    SendAck,
    SendAward,
    SendBid,
    SendCall,
    Start,
    Timing,
    allocate,
)
from daemon.swarm.cost import Situation, bid_costs, sector_cost
from daemon.swarm.geometry import waypoints, work_length

PROFILE = RobotProfile(max_speed_mps=5, range_m=10_000, sensors=["camera"])
T = Timing(settle_s=0.1, award_timeout_s=1.0, misses=3)


def point_mission(x: float = 10, y: float = 0, **kw: object) -> MissionAnnounce:
    return MissionAnnounce(mission="m1", target=Point(x=x, y=y), bid_window_s=0.5, **kw)  # type: ignore[arg-type]


def of(actions: list[Action], kind: type) -> list:  # type: ignore[type-arg]
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------------ messages


def test_messages_round_trip_and_refuse_bad_input() -> None:
    a = MissionAnnounce(mission="m1", target=Area(x0=0, y0=0, x1=100, y1=50), sectors=4)
    assert decode(encode(a), MissionAnnounce) == a
    b = Bid(issuer="alice", mission="m1", round=2, costs=[1.5, None])
    assert decode(encode(b), Bid) == b
    for bad in (
        b'{"type":"swarm.mission","mission":"m"}',  # no target
        b'{"type":"swarm.mission","mission":"m","target":{"x":1,"y":2},"sectors":3}',
        b'{"type":"swarm.bid","issuer":"a","mission":"m","costs":[NaN]}',
        b'{"type":"swarm.bid","issuer":"a","mission":"m","costs":[-1]}',
        b'{"type":"swarm.bid","issuer":"a/b","mission":"m","costs":[1]}',
        b'{"type":"swarm.mission","mission":"m","target":{"x0":5,"y0":0,"x1":1,"y1":1}}',
        b'{"type":"swarm.mission","mission":"m","target":{"x":1,"y":2,"x1":3}}',
    ):
        with pytest.raises(MessageError):
            decode(bad, MissionAnnounce if b'mission",' in bad[:30] else Bid)


# ------------------------------------------------------------------ geometry, cost


def test_area_is_cut_into_strips_swept_by_lanes() -> None:
    a = MissionAnnounce(mission="m", target=Area(x0=0, y0=0, x1=40, y1=30), sectors=2)
    first, second = waypoints(a, 0), waypoints(a, 1)
    assert all(0 <= p.x <= 20 for p in first) and all(20 <= p.x <= 40 for p in second)
    assert first[0] == Point(x=5, y=0) and first[1] == Point(x=5, y=30)
    assert work_length(a, 0) == pytest.approx(30 + 10 + 30)


def test_cost_is_travel_for_a_fresh_idle_robot_and_none_when_infeasible() -> None:
    m = point_mission(30, 40)
    fresh = Situation(PROFILE, Point(x=0, y=0), 100.0)
    assert sector_cost(fresh, m, 0, now=0) == pytest.approx(50.0)
    loaded = Situation(PROFILE, Point(x=0, y=0), 100.0, load_m=20)
    assert sector_cost(loaded, m, 0, now=0) == pytest.approx(70.0)
    tired = Situation(PROFILE, Point(x=0, y=0), 45.0)
    assert sector_cost(tired, m, 0, now=0) > 50.0  # type: ignore[operator]
    assert sector_cost(Situation(PROFILE, Point(x=0, y=0), 20.2), m, 0, now=0) is None
    needs = point_mission(30, 40, requirements=Requirements(sensors=["lidar"]))
    assert bid_costs(fresh, needs, frozenset({0}), now=0) is None
    late = point_mission(30, 40, deadline=5.0)  # 50 m at 5 m/s: 10 s
    assert sector_cost(fresh, late, 0, now=0) is None


# ------------------------------------------------------------------ allocation


def test_allocation_is_deterministic_with_ties_broken_by_node_id() -> None:
    bids = {"r2": [5.0], "r1": [5.0], "r3": [7.0]}
    assert allocate(bids, [0]) == {0: ("r1", 5.0)}
    assert allocate(dict(reversed(bids.items())), [0]) == {0: ("r1", 5.0)}


def test_allocation_gives_one_sector_per_robot_while_robots_last() -> None:
    bids = {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0, None]}
    assert allocate(bids, [0, 1, 2]) == {0: ("a", 1.0), 1: ("b", 5.0), 2: ("a", 3.0)}
    assert allocate(bids, [1]) == {1: ("a", 2.0)}


# ------------------------------------------------------------------ the auction


class Peer:
    """One participant's auction with a fixed bid."""

    def __init__(self, me: str, cost: float | None, m: MissionAnnounce, role: str = "peer"):
        self.me = me
        costs = None if cost is None else [cost] * m.sectors
        self.auction = Auction(
            "alice",
            m,
            role=role,  # type: ignore[arg-type]
            me=me,
            bidder=lambda _m, _r: costs,
            fleet=Fleet(),
            timing=T,
        )


def bid_of(actions: list[Action], issuer: str = "alice", mission: str = "m1") -> Bid:
    (b,) = of(actions, SendBid)
    return Bid(issuer=issuer, mission=mission, round=b.round, costs=b.costs)


def ack_of(a: SendAck) -> MissionAck:
    return MissionAck(issuer="alice", mission="m1", round=a.round, sector=a.sector)


def run_peers(peers: list[Peer], now: float = 0.0) -> dict[str, list[Action]]:
    """Deliver every bid to every peer, close the round, deliver claims, settle."""
    out: dict[str, list[Action]] = {}
    bids = {
        p.me: bid_of(p.auction.start(now)) for p in peers if p.auction.bidder(p.auction.announce, 1)
    }
    for p in peers:
        for sender, bid in bids.items():
            p.auction.on_bid(sender, bid, now)
    claims: list[tuple[str, Award]] = []
    for p in peers:
        out[p.me] = p.auction.tick(now + 0.5)
        claims += [(p.me, a.award) for a in of(out[p.me], SendAward)]
    for p in peers:
        for sender, award in claims:
            p.auction.on_award(sender, award, now + 0.52)
        out[p.me] += p.auction.tick(now + 0.7)
    return out


def test_peers_agree_on_one_winner_and_only_it_acks() -> None:
    m = point_mission()
    peers = [Peer("r3", 5.0, m), Peer("r1", 5.0, m), Peer("r2", 9.0, m)]  # r1, r3 tie
    out = run_peers(peers)
    assert [p.me for p in peers if of(out[p.me], SendAck)] == ["r1"]
    assert [p.me for p in peers if of(out[p.me], Start)] == ["r1"]
    assert all(p.auction.sectors[0].holder == "r1" for p in peers)


def test_concurrent_claims_resolve_to_the_best_and_the_other_yields() -> None:
    # r2 never saw r1's bid (late), so both decide at once that they won.
    m = point_mission()
    r1, r2 = Peer("r1", 4.0, m), Peer("r2", 6.0, m)
    b1, b2 = bid_of(r1.auction.start(0)), bid_of(r2.auction.start(0))
    r1.auction.on_bid("r2", b2, 0.1)
    c1 = of(r1.auction.tick(0.5), SendAward)[0].award
    c2 = of(r2.auction.tick(0.5), SendAward)[0].award
    for p in (r1, r2):
        for sender, claim in (("r2", c2), ("r1", c1)):
            p.auction.on_award(sender, claim, 0.55)
    assert of(r2.auction.tick(0.7), SendAck) == []
    assert of(r1.auction.tick(0.7), SendAck) == [SendAck(1, 0)]
    assert r2.auction.sectors[0].holder == "r1"
    del b1


def test_forged_claim_and_progress_are_rejected() -> None:
    m = point_mission()
    r1 = Peer("r1", 4.0, m)
    r1.auction.start(0)
    forged = Award(issuer="alice", mission="m1", round=1, winner="r9", cost=0.0)
    (rej,) = of(r1.auction.on_award("evil", forged, 0.1), Reject)
    assert rej.hostile
    bad = Bid(issuer="alice", mission="m1", round=1, costs=[1.0, 2.0])
    assert of(r1.auction.on_bid("evil", bad, 0.1), Reject)[0].hostile
    p = MissionProgress(issuer="alice", mission="m1", round=1, status="done")
    assert of(r1.auction.on_progress("evil", p, 0.1), Reject)[0].hostile
    assert r1.auction.sectors[0].phase == "open"


def test_a_winner_that_drops_out_or_fails_is_replaced_in_the_next_round() -> None:
    m = point_mission()
    peers = [Peer("r1", 1.0, m), Peer("r2", 2.0, m), Peer("r3", 3.0, m)]
    run_peers(peers)
    r2, r3 = peers[1], peers[2]
    for p in (r2, r3):
        p.auction.on_ack("r1", MissionAck(issuer="alice", mission="m1", round=1), 0.7)
        acts = p.auction.on_lost("r1", 2.0)  # its will
        assert p.auction.round == 2 and of(acts, SendBid)
    b2, b3 = Bid(issuer="alice", mission="m1", round=2, costs=[2.0]), None
    b3 = Bid(issuer="alice", mission="m1", round=2, costs=[3.0])
    for p in (r2, r3):
        p.auction.on_bid("r2", b2, 2.1)
        p.auction.on_bid("r3", b3, 2.1)
    claim = of(r2.auction.tick(2.5), SendAward)[0].award
    assert claim.winner == "r2" and claim.round == 2
    assert of(r3.auction.tick(2.5), SendAward) == []
    # r2 fails: round 3, r2 left out, r3 wins
    for p in (r2, r3):
        p.auction.on_award("r2", claim, 2.55)
    r2.auction.tick(2.7)
    r3.auction.on_ack("r2", MissionAck(issuer="alice", mission="m1", round=2), 2.7)
    failed = MissionProgress(issuer="alice", mission="m1", round=2, status="failed")
    acts = r3.auction.on_progress("r2", failed, 3.0)
    assert r3.auction.round == 3 and "r2" in r3.auction.excluded and of(acts, SendBid)


def test_missed_heartbeats_reopen_and_a_silent_winner_is_skipped() -> None:
    m = point_mission()
    fleet = Fleet()
    w = Auction("alice", m, role="watcher", fleet=fleet, timing=T)
    w.start(0)
    w.on_bid("r1", Bid(issuer="alice", mission="m1", costs=[1.0]), 0.1)
    w.on_bid("r2", Bid(issuer="alice", mission="m1", costs=[2.0]), 0.1)
    w.tick(0.5)
    assert w.sectors[0].expected == "r1"
    acts = w.tick(1.6)  # r1 never claimed within the award timeout
    assert w.round == 2 and "r1" not in w.excluded and not of(acts, SendBid)
    w.on_bid("r2", Bid(issuer="alice", mission="m1", round=2, costs=[2.0]), 1.7)
    w.tick(2.1)
    w.on_award("r2", Award(issuer="alice", mission="m1", round=2, winner="r2", cost=2.0), 2.2)
    w.on_ack("r2", MissionAck(issuer="alice", mission="m1", round=2), 2.3)
    fleet.heard("r2", 0.5, 2.3)
    assert w.tick(3.0) == [] and w.sectors[0].phase == "held"
    w.tick(4.0)  # 1.7 s > 3 heartbeats of 0.5 s
    assert w.round == 3 and w.sectors[0].phase == "open"


def test_auctioneer_awards_calls_rounds_and_finishes() -> None:
    m = point_mission(auctioneer="orchestrator")
    a = Auction("alice", m, role="auctioneer", me="orchestrator", timing=T)
    a.start(0)
    a.on_bid("r1", Bid(issuer="alice", mission="m1", costs=[3.0]), 0.1)
    a.on_bid("r2", Bid(issuer="alice", mission="m1", costs=[2.0]), 0.1)
    (award,) = of(a.tick(0.5), SendAward)
    assert award.award.winner == "r2"
    acts = a.tick(1.6)  # no ack: r2 is skipped, round 2 is called
    assert of(acts, SendCall) == [SendCall(2, "sector 0: r2 did not acknowledge")]
    a.on_bid("r1", Bid(issuer="alice", mission="m1", round=2, costs=[3.0]), 1.7)
    (award,) = of(a.tick(2.2), SendAward)
    assert award.award.winner == "r1" and award.award.round == 2
    a.on_ack("r1", MissionAck(issuer="alice", mission="m1", round=2), 2.3)
    done = MissionProgress(issuer="alice", mission="m1", round=2, status="done")
    assert of(a.on_progress("r1", done, 5.0), Finished) == [Finished("done")]
    # a bidder starts what the auctioneer awards it, and nothing from anyone else
    r1 = Auction("alice", m, role="bidder", me="r1", bidder=lambda _m, _r: [3.0], timing=T)
    r1.start(0)
    assert of(r1.on_award("r2", award.award, 0.6), Reject)[0].hostile
    one = Award(issuer="alice", mission="m1", round=1, winner="r1", cost=3.0)
    assert of(r1.on_award("orchestrator", one, 0.6), Start) == [Start(1, 0)]


def test_coverage_sectors_go_one_per_robot() -> None:
    m = MissionAnnounce(mission="m1", target=Area(x0=0, y0=0, x1=90, y1=30), sectors=3)
    sits = {
        n: Situation(PROFILE, Point(x=x, y=0), 100.0) for n, x in (("a", 0), ("b", 45), ("c", 90))
    }
    peers = []
    for n, sit in sits.items():
        auction = Auction(
            "alice",
            m,
            role="peer",
            me=n,
            timing=T,
            bidder=lambda mm, _r, s=sit: bid_costs(s, mm, frozenset(range(3)), 0),
        )
        peers.append((n, auction))
    bids = {n: bid_of(a.start(0)) for n, a in peers}
    for _, a in peers:
        for n, b in bids.items():
            a.on_bid(n, b, 0.1)
    won = {n: [x.award.sector for x in of(a.tick(0.5), SendAward)] for n, a in peers}
    assert won == {"a": [0], "b": [1], "c": [2]}


def test_a_robot_that_acked_too_early_drops_the_sector_for_a_better_late_claim() -> None:
    from daemon.swarm.auction import Abandon

    m = point_mission()
    r1 = Peer("r1", 6.0, m)
    r1.auction.start(0)
    (claim,) = of(r1.auction.tick(0.5), SendAward)  # r1 saw only its own bid
    r1.auction.on_award("r1", claim.award, 0.5)
    assert of(r1.auction.tick(0.7), Start) == [Start(1, 0)]
    better = Award(issuer="alice", mission="m1", round=1, winner="r0", cost=4.0)
    acts = r1.auction.on_award("r0", better, 0.9)  # r0's claim came after the settle
    assert of(acts, Abandon) and r1.auction.sectors[0].holder == "r0"
    worse = Award(issuer="alice", mission="m1", round=1, winner="r9", cost=9.0)
    assert not of(r1.auction.on_award("r9", worse, 1.0), Abandon)


def test_joint_allocation_is_near_the_optimum() -> None:
    import math
    import random

    np = pytest.importorskip("numpy")
    optimize = pytest.importorskip("scipy.optimize")
    rng = random.Random(5)
    robots = {f"r{i:02d}": (rng.uniform(0, 1000), rng.uniform(0, 1000)) for i in range(50)}
    spots = [(rng.uniform(0, 1000), rng.uniform(0, 1000)) for _ in range(40)]
    bids = {n: [math.dist(p, s) for s in spots] for n, p in robots.items()}
    won = allocate(bids, list(range(40)))
    assert len({n for n, _ in won.values()}) == 40  # one per robot
    cost = np.array(list(bids.values()))
    rows, cols = optimize.linear_sum_assignment(cost)
    assert sum(c for _, c in won.values()) <= 1.10 * cost[rows, cols].sum()
    assert allocate(dict(reversed(bids.items())), list(range(40))) == won


def test_a_round_without_bids_waits_one_more_window_then_fails() -> None:
    m = point_mission()
    a = Auction("alice", m, role="auctioneer", me="orchestrator", timing=T)
    a.start(0)
    assert a.tick(0.5) and a.sectors[0].phase == "open"  # extended once
    a.on_bid("r1", Bid(issuer="alice", mission="m1", costs=[2.0]), 0.8)
    assert of(a.tick(1.0), SendAward)[0].award.winner == "r1"
    b = Auction("alice", m, role="auctioneer", me="orchestrator", timing=T)
    b.start(0)
    b.tick(0.5)
    assert of(b.tick(1.0), Finished) == [Finished("failed")]
    w = Auction("alice", m, role="watcher", timing=T)  # a watcher waits for a claim
    w.start(0)
    w.tick(0.5)
    w.tick(1.0)
    claim = Award(issuer="alice", mission="m1", round=1, winner="r1", cost=2.0)
    w.on_award("r1", claim, 1.2)
    assert w.sectors[0].holder == "r1"


async def test_the_robot_is_a_home_assistant_device_tracker() -> None:
    """Its discovery config is one Home Assistant accepts, and the attributes template,
    rendered as Home Assistant does against the robot's real retained state, puts a
    GNSS robot on the map and always carries x / y, status and battery."""
    import json
    from pathlib import Path
    from typing import Any, cast

    from daemon.config import build_config
    from daemon.homeassistant.discovery import Device, entity_config
    from daemon.node import NodeContext
    from daemon.protocol.swarm import GeoFix, RobotProfile, RobotState
    from nodes.swarm.config import SwarmConfig
    from nodes.swarm.node import SwarmNode
    from tests import ha_discovery_schema as schema

    async def noop() -> None:
        return None

    ctx = NodeContext(
        node_id="r1",
        config=build_config({"realm": "home", "nodes": {}}),
        bus=cast(Any, None),
        state_dir=Path("state"),
        announce=noop,
    )
    node = SwarmNode("robot", SwarmConfig.model_validate({"driver": {"type": "sim"}}), ctx)
    await node.setup()
    device = Device("mtor_home_r1", "mtor_home_r1", "r1", "M-TOR node")
    configs = {}
    for spec in node.entities():
        object_id, cfg = entity_config(spec, device, realm="home", node_id="r1")
        assert schema.problems(spec.component, cfg) == [], (object_id, cfg)
        configs[spec.component, object_id] = cfg
    tracker = configs["device_tracker", "robot_position"]
    assert tracker["json_attributes_topic"] == "mtor/home/swarm/robot/r1"
    profile = RobotProfile(max_speed_mps=5, range_m=1000)
    state = RobotState(
        status="en_route", pose=Point(x=3, y=4), battery_percent=80, profile=profile,
        heartbeat_s=5,
    )  # fmt: skip
    local = json.loads(schema.render(tracker["json_attributes_template"], encode(state)))
    assert local == {
        "x": 3.0,
        "y": 4.0,
        "status": "en_route",
        "battery_level": 80.0,
        "heading": 0.0,
    }
    fixed = state.model_copy(update={"geo": GeoFix(lat=47.5, lon=8.5)})
    geo = json.loads(schema.render(tracker["json_attributes_template"], encode(fixed)))
    assert (geo["latitude"], geo["longitude"], geo["gps_accuracy"]) == (47.5, 8.5, 5)
