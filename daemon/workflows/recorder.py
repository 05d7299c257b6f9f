"""History of local workflow runs, kept by the orchestrator from their run events.

A ``local: true`` workflow runs in a node daemon, which has no history
database; its run events (``workflow/<name>/event``) say everything a
history row holds.  The orchestrator folds the ``started`` / ``step`` /
``finished`` events of each such run into one row of the same
``workflow_runs`` table its own runs go to.  Runs that end while the
orchestrator is away are not recorded (their events are not retained).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from daemon.bus import Inbound
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.workflow import WorkflowEvent

log = logging.getLogger(__name__)

MAX_OPEN_RUNS: Final = 1000  # local runs followed at once (oldest forgotten first)
MAX_STEPS: Final = 200  # steps kept per run


class LocalRunRecorder:
    """Feed it run events (``on_event``); it calls ``record(row)`` for each finished
    run of a workflow that ran somewhere else than ``here``."""

    def __init__(self, record: Callable[[dict[str, Any]], None], here: str) -> None:
        self.record = record
        self.here = here
        self._open: OrderedDict[str, tuple[float, list[dict[str, Any]]]] = OrderedDict()
        self.recorded = 0

    async def on_event(self, msg: Inbound) -> None:
        try:
            event = decode(msg.payload, WorkflowEvent)
        except MessageError as exc:
            log.warning("bad workflow run event on %s: %s", msg.topic, exc)
            return
        if event.where == self.here or event.run_id == "-":
            return
        if event.kind == "started":
            self._open[event.run_id] = (event.ts, [])
            while len(self._open) > MAX_OPEN_RUNS:
                self._open.popitem(last=False)
        elif event.kind == "step":
            started, steps = self._open.setdefault(event.run_id, (event.ts, []))
            if len(steps) < MAX_STEPS:
                steps.append(
                    {
                        "id": event.step,
                        "kind": event.step_kind,
                        "status": event.status,
                        "duration_ms": event.duration_ms,
                        "attempts": event.attempts,
                        "error": event.error.model_dump() if event.error else None,
                    }
                )
        elif event.kind == "finished":
            duration_s = (event.duration_ms or 0.0) / 1000
            started, steps = self._open.pop(event.run_id, (event.ts - duration_s, []))
            self.record(
                {
                    "run_id": event.run_id,
                    "workflow": event.workflow,
                    "where_": event.where,
                    "trigger": event.trigger,
                    "started": started,
                    "duration_ms": event.duration_ms,
                    "outcome": event.status,
                    "error_code": event.error.code if event.error else None,
                    "error": event.error.message if event.error else None,
                    "steps": json.dumps(steps, separators=(",", ":")),
                }
            )
            self.recorded += 1
