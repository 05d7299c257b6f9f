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

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from daemon import topics
from daemon.accounts import ORCHESTRATOR_ACCOUNT
from daemon.bus import Inbound
from daemon.errors import MessageError, TaskError
from daemon.hosting import DaemonPort
from daemon.messages import decode
from daemon.orchestrator.state import StateView
from daemon.protocol.workflow import WorkflowRequest
from daemon.worker import TaskRun
from daemon.workflows.engine import Engine, EngineError
from daemon.workflows.loader import load_workflows
from daemon.workflows.runner import StepFailed

if TYPE_CHECKING:
    from daemon.worker import Worker

log = logging.getLogger(__name__)


# A task step for a capability of a node still starting waits this long for it (s),
# looking every NODE_START_POLL.
NODE_START_WAIT: Final = 60.0
NODE_START_POLL: Final = 0.1


class LocalHost(DaemonPort, Protocol):
    """What local workflows use of the node daemon that runs them
    (:class:`daemon.runtime.NodeDaemon` is one): its identity, its bus, and its
    worker's routes to the nodes that run a capability."""

    @property
    def worker(self) -> Worker: ...

    def starting(self) -> bool:
        """Is a hosted node still starting (its capabilities may yet come)?"""


class LocalPorts:
    def __init__(self, daemon: LocalHost, view: StateView) -> None:
        self.daemon = daemon
        self.view = view
        self.realm = daemon.config.realm

    async def run_task(
        self, capability: str, input: Any, *, timeout: float | None, priority: str, node: str | None
    ) -> Any:
        route = self.daemon.worker.routes.get(capability)
        # A run right after the daemon came online: its nodes may still be loading.
        waited = 0.0
        while route is None and self.daemon.starting() and waited < NODE_START_WAIT:
            await asyncio.sleep(NODE_START_POLL)
            waited += NODE_START_POLL
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
    def __init__(self, daemon: LocalHost) -> None:
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
        # Runs come only from the orchestrator, which checked who asked (docs/security.md).
        realm = self.daemon.config.realm
        topic = topics.WORKFLOW_REQUEST.build(realm=realm, user=ORCHESTRATOR_ACCOUNT)
        await self.daemon.bus.subscribe(topic, self.on_request)

    async def stop(self) -> None:
        await self.engine.stop()

    async def on_request(self, msg: Inbound) -> None:
        """A ``run`` of one of this node's workflows, handed on by the orchestrator (which
        answered the requester); the run's events tell how it went."""
        if msg.retain:
            return
        try:
            req = decode(msg.payload, WorkflowRequest)
        except MessageError as exc:
            log.warning("bad workflow run request: %s", exc)
            return
        if req.op != "run" or req.name not in self.engine.flows:
            return
        try:
            self.engine.start_manual(req.name, req.input, req.user, run_id=req.run_id)
        except EngineError as exc:
            log.warning("workflow %s not started: %s", req.name, exc)


async def start_local_workflows(daemon: LocalHost) -> LocalWorkflows | None:
    """Start the daemon's local workflows (None when its config has none)."""
    if not any(w.local for w in load_workflows(daemon.config).values()):
        return None
    local = LocalWorkflows(daemon)
    await local.start()
    return local
