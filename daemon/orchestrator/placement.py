"""Placement: which free peer gets a task, and where its worker may answer.

:meth:`Placement.pick` samples the capability's free set (``policy.SAMPLE_SIZE``
peers: an assignment never scans the realm), keeps those that fit the task's
constraints and have not failed it already, and lets :func:`policy.choose`
score them.  Pure: the registry, a random source and a clock.
"""

from __future__ import annotations

import random

from daemon import topics
from daemon.orchestrator import policy
from daemon.orchestrator.ports import Clock
from daemon.orchestrator.registry import Peer, Registry
from daemon.orchestrator.tasks import Task
from daemon.protocol.task import Constraints, DirectReply


class Placement:
    def __init__(self, registry: Registry, rng: random.Random, clock: Clock) -> None:
        self.registry = registry
        self.rng = rng
        self.clock = clock

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
