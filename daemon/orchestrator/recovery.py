"""Recovery: the tasks a previous run or the previous active left, taken up again.

* :func:`recover` — this state_dir's own journal after a restart (no one else
  ran meanwhile): every task is queued again (clients resubmit what they wait
  for and join it by task id, never run twice by the orchestrator).
* :func:`adopt` — a standby taking over (see :mod:`daemon.orchestrator.ha`):
  finals the old active had not made final are made; assigned tasks stay with
  their worker, which re-announces them to the new epoch (one that does not
  within ``ack_timeout`` is presumed gone and the task retried); the rest is
  queued.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from daemon.orchestrator.core import Scheduler
from daemon.orchestrator.tasks import Mirrored, task_from

log = logging.getLogger(__name__)


def recover(core: Scheduler, docs: Iterable[dict[str, Any]]) -> int:
    """Queue the journal's tasks again; returns how many were readable."""
    n = 0
    for doc in docs:
        task = task_from(doc)
        if task is not None:
            core.tasks[task.id] = task
            core.queue(task.capability).push(task)
            core.arm_deadline(task)
            n += 1
    return n


def adopt(core: Scheduler, mirror: dict[str, Mirrored]) -> None:
    """Take over the previous active's tasks, as this standby mirrored them."""
    for task_id, m in mirror.items():
        if task_id in core.tasks:
            continue
        task = task_from(m.doc)
        if task is None:
            continue
        core.tasks[task.id] = task
        core.sink.accepted(task)
        core.arm_deadline(task)
        peer = core.registry.peers.get(m.node) if m.node else None
        if m.final is not None and m.node is not None:
            task.attempt, task.node = m.attempt, m.node
            core.finish_reported(task, m.final)
        elif peer is not None and task.capability in peer.slots:
            core.hold(task, peer, attempt=m.attempt)
            task.ack_key = core.ack_timeouts.add_in(task, core.cfg.ack_timeout)
        else:
            core.queue(task.capability).push(task)
    if mirror:
        log.info("took over %d task(s) from the previous active", len(mirror))
