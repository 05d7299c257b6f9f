"""Workflows marked ``local: true``, run inside the node daemon.

They use only what the node has: its own nodes' capabilities executed in
process (no orchestrator, no broker round trip), publishes (kept in the bus
outbox while the broker is away), waits for events and the realm state last
seen on the retained ``state/<key>`` topics.  So they go on working when the
orchestrator is down; schedule-triggered ones also when the broker is down.
Runs are announced on ``workflow/<name>/event`` (``where`` is the node id);
they are not in the orchestrator's SQLite history.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from daemon import topics
from daemon.bus import Inbound
from daemon.errors import MessageError, TaskError
from daemon.messages import decode
from daemon.orchestrator.state import StateView
from daemon.protocol.workflow import WorkflowReply, WorkflowRequest
from daemon.worker import TaskRun
from daemon.workflows.engine import Engine, EngineError
from daemon.workflows.loader import load_workflows
from daemon.workflows.runner import StepFailed

if TYPE_CHECKING:
    from daemon.runtime import NodeDaemon

log = logging.getLogger(__name__)


class LocalPorts:
    def __init__(self, daemon: NodeDaemon, view: StateView) -> None:
        self.daemon = daemon
        self.view = view
        self.realm = daemon.config.realm

    async def run_task(
        self, capability: str, input: Any, *, timeout: float | None, priority: str, node: str | None
    ) -> Any:
        route = self.daemon.worker.routes.get(capability)
        if route is None:
            raise StepFailed("unavailable", f"{self.daemon.node_id} has no {capability!r}")
        run = TaskRun(
            task_id="wf-" + uuid.uuid4().hex[:12],
            capability=capability,
            input=input,
            deadline=time.time() + timeout if timeout else None,
        )
        try:
            return await route[0].execute(run)
        except TaskError as exc:
            raise StepFailed(exc.code, str(exc)) from exc

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        await self.daemon.bus.publish(topic, payload, qos=qos, retain=retain, wait=False)

    async def set_state(self, key: str, value: Any, by: str) -> None:
        raise StepFailed("unsupported", "set_state is not available in a local workflow")

    def state(self) -> Mapping[str, Any]:
        return self.view.snapshot()

    def has_capability(self, name: str) -> bool:
        return name in self.daemon.worker.routes


class LocalWorkflows:
    def __init__(self, daemon: NodeDaemon) -> None:
        self.daemon = daemon
        flows = {n: w for n, w in load_workflows(daemon.config).items() if w.local}
        self.view = StateView(daemon.bus, daemon.config.realm)
        self.engine = Engine(
            daemon.bus,
            daemon.config.realm,
            flows,
            LocalPorts(daemon, self.view),
            self.view,
            where=daemon.node_id,
        )

    async def start(self) -> None:
        await self.view.start()
        await self.engine.start()
        topic = topics.WORKFLOW_REQUEST.build(realm=self.daemon.config.realm)
        await self.daemon.bus.subscribe(topic, self.on_request)

    async def stop(self) -> None:
        await self.engine.stop()

    async def on_request(self, msg: Inbound) -> None:
        """Only ``run`` of this node's own workflows is answered (the orchestrator: the rest)."""
        try:
            req = decode(msg.payload, WorkflowRequest)
        except MessageError:
            return  # the orchestrator answers malformed requests
        if req.op != "run" or req.name not in self.engine.flows:
            return
        try:
            run_id = self.engine.start_manual(req.name, req.input, req.user)
            reply = WorkflowReply(
                ok=True,
                result={"run_id": run_id, "workflow": req.name},
                correlation=req.correlation,
            )
        except EngineError as exc:
            reply = WorkflowReply(
                ok=False, error=str(exc), code=exc.code, correlation=req.correlation
            )
        topic = msg.response_topic or req.reply_to
        if topics.valid_reply_topic(topic):
            self.daemon.bus.post(topic, reply, correlation_data=msg.correlation_data)


async def start_local_workflows(daemon: NodeDaemon) -> LocalWorkflows | None:
    """Start the daemon's local workflows (None when its config has none)."""
    if not any(w.local for w in load_workflows(daemon.config).values()):
        return None
    local = LocalWorkflows(daemon)
    await local.start()
    return local
