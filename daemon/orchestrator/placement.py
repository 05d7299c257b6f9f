"""Placement: which free peer gets a task, whether one may come, and where its
worker may answer.

:meth:`Placement.pick` samples the capability's free set (``policy.SAMPLE_SIZE``
peers: an assignment never scans the realm), keeps those that fit the task's
constraints and have not failed it already, and lets :func:`policy.choose`
score them.  Pure: the registry, a random source and a clock.
"""

from __future__ import annotations

import random

from daemon import topics
from daemon.orchestrator import policy
from daemon.orchestrator.identity import Refused
from daemon.orchestrator.ports import Clock
from daemon.orchestrator.registry import Peer, Registry
from daemon.orchestrator.tasks import Task
from daemon.protocol.task import Constraints, DirectReply, TaskSubmit


class Placement:
    def __init__(
        self, registry: Registry, rng: random.Random, clock: Clock, wait: float = 0.0
    ) -> None:
        self.registry = registry
        self.rng = rng
        self.clock = clock
        self.wait = wait  # orchestrator.capability_wait

    def offered(self, submit: TaskSubmit) -> bool:
        """Does a peer offer what ``submit`` asks for (the node it names, if any)?"""
        pin = submit.constraints.node
        peer = self.registry.peers.get(pin) if pin else None
        if pin and peer is None:
            return False
        return bool(
            (peer.slots if peer is not None else self.registry.index).get(submit.capability)
        )

    def waits_for(self, submit: TaskSubmit, active_since: float) -> str | None:
        """None when a peer offers what ``submit`` asks for; else why one may come
        soon — the realm is starting (no peer online yet, within ``wait`` of taking
        the lease) or a node is still starting (loading a model) — and the task
        waits ``wait`` for it; else :class:`Refused` at once."""
        cap, pin = submit.capability, submit.constraints.node
        peer = self.registry.peers.get(pin) if pin else None
        if peer is not None and (peer.blacklisted or peer.drained):
            flag = "blacklisted" if peer.blacklisted else "drained"
            raise Refused("unavailable", f"peer {pin!r} is {flag} by a sysop")
        if self.offered(submit):
            return None
        why = self._starting(active_since) if self.wait else None
        if why is not None:
            return why
        if pin and peer is None:
            raise Refused("unavailable", f"no peer {pin!r} in the realm")
        if pin:
            raise Refused("unavailable", f"peer {pin!r} does not offer {cap!r}")
        raise Refused("unavailable", f"no peer offers {cap!r}")

    def _starting(self, active_since: float) -> str | None:
        online = [p for p in self.registry.peers.values() if p.online and not p.stale]
        if not online and self.clock.monotonic() - active_since < self.wait:
            return "the realm is starting"
        for p in online:
            if p.info is not None and any(
                n.status in ("starting", "restarting") for n in p.info.nodes
            ):
                return f"{p.node_id} is still starting"
        return None

    def pick(self, task: Task) -> Peer | None:
        """The best free peer for ``task``, or None."""
        cap = task.capability
        registry = self.registry
        free = registry.free[cap]
        c = task.submit.constraints
        if c.node:
            ids = [c.node] if c.node in free else []
        else:
            ids = free.sample(policy.SAMPLE_SIZE, self.rng)
            if _has_constraints(c) or task.tried:
                fitting = [i for i in ids if self._fits(i, task)]
                if not fitting and len(free) > len(ids):
                    fitting = [i for i in free.items if self._fits(i, task)]
                ids = fitting
        if not ids:
            return None
        mono = self.clock.monotonic()
        if len(ids) == 1:  # nothing to compare: what policy.choose would say of one
            peer = registry.peers[ids[0]]
            slot = peer.slots[cap]
            if not registry.usable(peer, cap, mono):
                return None
            return peer if slot.in_use < slot.capacity else None
        candidates = []
        for node_id in ids:
            peer = registry.peers[node_id]
            if registry.usable(peer, cap, mono):
                local = c.prefer_local and node_id == task.submit.origin
                candidates.append(peer.candidate(cap, local=local))
        best = policy.choose(candidates)
        return registry.peers[best.node_id] if best else None

    def _fits(self, node_id: str, task: Task) -> bool:
        peer = self.registry.peers[node_id]
        if node_id in task.tried and len(task.tried) < len(self.registry.index[task.capability]):
            return False  # another peer first: this one failed the task already
        c = task.submit.constraints
        if c.accelerator and not peer.has_accelerator:
            return False
        return peer.slots[task.capability].offers(c.backend, c.model, c.language)


def direct_reply(task: Task, realm: str, enabled: bool) -> DirectReply | None:
    """Where the worker may send ``done`` itself: only the first attempt of a task
    whose submitter asked for it and gets no other update from us in between
    (``started`` would come from us, numbered after the worker's final)."""
    submit = task.submit
    if not (enabled and submit.direct and submit.reply_key):
        return None
    if task.attempt != 1 or task.watchers or submit.progress:
        return None
    # reply/<account>/<x>/direct beside the task's reply topic reply/<account>/<x>/...:
    # the only reply topics the generated ACL lets node accounts write, and the
    # submitter drops what lacks its reply_key there.
    fields = topics.REPLY.parse(task.reply_topic or "")
    if fields is None:
        return None
    first = fields["rest"].split("/", 1)[0]
    return DirectReply(
        topic=topics.REPLY.build(realm=realm, user=fields["user"], rest=f"{first}/direct"),
        key=submit.reply_key,
        correlation_data=task.correlation.hex() if task.correlation else None,
        correlation=submit.correlation,
        seq=task.seq,
        queue_ms=task.queue_ms,
    )


def _has_constraints(c: Constraints) -> bool:
    return bool(c.accelerator or c.language or c.backend or c.model)
