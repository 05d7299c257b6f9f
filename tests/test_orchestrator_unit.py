"""Pure parts of the orchestrator: policy, fair queues, breakers, rate limits."""

from __future__ import annotations

import random
from dataclasses import dataclass

from daemon.orchestrator import policy
from daemon.orchestrator.breaker import Breaker
from daemon.orchestrator.config import BreakerConfig
from daemon.orchestrator.queues import FairQueue
from daemon.orchestrator.registry import IndexedSet
from daemon.orchestrator.tasks import TokenBucket
from daemon.protocol.task import PRIORITY_RANK

C = policy.Candidate


def test_choose_prefers_free_fast_healthy_peers() -> None:
    busy = C("busy", in_use=3, capacity=4)
    idle = C("idle", in_use=0, capacity=4)
    assert policy.choose([busy, idle]) == idle
    full = C("full", in_use=4, capacity=4)
    assert policy.choose([full]) is None
    slow = C("slow", 0, 4, latency_ms=900)
    fast = C("fast", 0, 4, latency_ms=5)
    assert policy.choose([slow, fast]) == fast
    flaky = C("flaky", 0, 4, success=0.5)
    assert policy.choose([flaky, C("ok", 1, 4)]).node_id == "ok"
    loaded = C("loaded", 0, 4, load_per_core=1.5)
    assert policy.choose([loaded, C("cool", 0, 4)]).node_id == "cool"


def test_local_bonus_and_probation_penalty() -> None:
    remote = C("remote", 0, 4)
    local = C("local", 1, 4, local=True)
    assert policy.choose([remote, local]) == local
    probation = C("probe", 0, 4, probation=True)
    assert policy.choose([probation, C("steady", 1, 4)]).node_id == "steady"
    # but a peer on probation still gets work when it is the only one
    assert policy.choose([probation]) == probation


def test_unknown_latency_is_explored() -> None:
    new = C("new", 0, 4, latency_ms=None)
    slowish = C("slowish", 0, 4, latency_ms=400)
    assert policy.choose([slowish, new]) == new


def test_sample_small_and_large() -> None:
    ids = [f"n{i}" for i in range(10)]
    assert policy.sample(ids) == ids
    many = [f"n{i}" for i in range(1000)]
    s = policy.sample(many, 16, random.Random(1))
    assert len(s) == 16 and len(set(s)) == 16


@dataclass(eq=False)
class Item:
    user: str
    prio: str = "interactive"
    name: str = ""
    ticket: int | None = None

    @property
    def rank(self) -> int:
        return PRIORITY_RANK[self.prio]


def test_fair_queue_round_robin_and_priority() -> None:
    q: FairQueue[Item] = FairQueue(100)
    for i in range(5):
        q.push(Item("hog", name=f"h{i}"))
    q.push(Item("alice", name="a0"))
    q.push(Item("bob", prio="batch", name="b0"))
    q.push(Item("carol", prio="alarm", name="c0"))
    order = []
    while (item := q.pop()) is not None:
        order.append(item.name)
    assert order[0] == "c0"  # alarm first
    assert order.index("a0") <= 2  # alice is not starved behind the hog's five
    assert order[-1] == "b0"  # batch last
    assert len(q) == 0


def test_fair_queue_skips_users_at_limit_and_discards_lazily() -> None:
    q: FairQueue[Item] = FairQueue(3)
    a, b, c = Item("u1", name="a"), Item("u2", name="b"), Item("u1", name="c")
    q.push(a)
    q.push(b)
    q.push(c)
    assert q.full
    assert q.pop(lambda u: u != "u1") is b
    q.discard(a)
    q.discard(a)  # twice is harmless
    assert len(q) == 1
    assert q.pop() is c
    assert q.pop() is None
    # re-queueing an item after removal works and is not duplicated
    q.push(a)
    q.discard(a)
    q.push(a, front=True)
    assert [i.name for i in q] == ["a"]
    assert q.pop() is a
    assert q.pop() is None and len(q) == 0


def test_breaker_trips_cools_down_and_probates() -> None:
    b = Breaker(
        BreakerConfig(failure_threshold=2, cooldown=10, max_cooldown=25, probation_successes=2)
    )
    assert b.allows(0)
    b.on_failure(0)
    assert b.state == "closed"
    b.on_failure(1)
    assert b.state == "open" and not b.allows(5)
    assert b.allows(11) and b.state == "half_open"
    b.on_assign()
    assert not b.allows(11)  # one probe at a time
    b.on_failure(12)  # probe failed: open again, doubled cool-down
    assert b.state == "open" and b.open_until == 12 + 20
    assert b.allows(33)
    b.on_assign()
    b.on_success()
    assert b.state == "half_open"
    b.on_assign()
    b.on_success()
    assert b.state == "closed" and b.trips == 0
    # cool-down is capped
    for t in range(10):
        b.trip(100 + t)
    assert b.open_until - 109 == 25


def test_token_bucket() -> None:
    tb = TokenBucket(rate=2, burst=3)
    assert [tb.take(0) for _ in range(4)] == [True, True, True, False]
    assert tb.take(0.5)  # one token back after 0.5 s
    assert not tb.take(0.5)
    assert TokenBucket(rate=0, burst=1).take(0)


def test_indexed_set() -> None:
    s = IndexedSet()
    for x in "abcde":
        s.add(x)
    s.add("a")
    s.discard("b")
    s.discard("zz")
    assert sorted(s.items) == ["a", "c", "d", "e"] and "b" not in s and len(s) == 4
    assert sorted(s.sample(10, random.Random(0))) == ["a", "c", "d", "e"]
    assert len(s.sample(2, random.Random(0))) == 2


def test_registry_forgets_long_gone_peers_only() -> None:
    from daemon.orchestrator.config import BreakerConfig
    from daemon.orchestrator.registry import Registry
    from daemon.protocol.node import Capability, Hardware, NodeInfo, NodeState

    reg = Registry(BreakerConfig())
    for node_id in ("gone", "drained", "busy", "here"):
        reg.on_state(node_id, NodeState(state="online", boot_id="b"), now=0.0)
        info = NodeInfo(
            node_id=node_id,
            boot_id="b",
            version="t",
            hostname=node_id,
            hardware=Hardware(arch="x86_64", cpu_count=1, ram_mb=1),
            capabilities=[Capability(name="echo", node="n")],
        )
        reg.on_info(node_id, info, now=0.0)
    for node_id in ("gone", "drained", "busy"):
        reg.on_state(node_id, NodeState(state="offline", boot_id="b"), now=0.0)
    reg.peers["drained"].drained = True  # a sysop's flag is kept
    reg.peers["busy"].slots["echo"].in_use = 1  # a task still to be released
    reg.seen("here", 100.0)
    assert reg.forget(50.0, after=60.0) == []  # not gone long enough
    assert reg.forget(100.0, after=60.0) == ["gone"]
    assert set(reg.peers) == {"drained", "busy", "here"}
    assert reg.index["echo"] == {"drained", "busy", "here"}
