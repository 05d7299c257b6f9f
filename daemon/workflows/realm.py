"""Workflows in the orchestrator: realm-wide ports, requests and history.

Tasks go through the realm like any client's (a :class:`RealmClient` on the
orchestrator's own bus, as user ``workflows``); ``set_state`` goes through the
realm state store's validation; ``capability`` conditions read the registry.
Requests on ``workflows/request`` (``run`` / ``list`` / ``history``) are
answered with a :class:`~daemon.protocol.workflow.WorkflowReply`.  Runs of
local workflows on node daemons go into the same history, from their run
events (:mod:`daemon.workflows.recorder`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from daemon import topics
from daemon.accounts import ORCHESTRATOR_ACCOUNT
from daemon.bus import Inbound
from daemon.client import RealmClient, TaskFailed
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.orchestrator.state import StateError
from daemon.protocol.task import Constraints
from daemon.protocol.workflow import WorkflowReply, WorkflowRequest
from daemon.workflows.engine import Engine, EngineError
from daemon.workflows.loader import load_workflows
from daemon.workflows.recorder import LocalRunRecorder
from daemon.workflows.runner import StepFailed

if TYPE_CHECKING:
    from daemon.bus import Bus
    from daemon.config import Config
    from daemon.orchestrator.admission import Admission
    from daemon.orchestrator.registry import Registry
    from daemon.orchestrator.state import RealmStateStore
    from daemon.orchestrator.store import Store

log = logging.getLogger(__name__)

WORKFLOW_USER: Final = "workflows"


class RealmPorts:
    """What an orchestrator-side run may do."""

    def __init__(
        self, bus: Bus, state: RealmStateStore, registry: Registry, client: RealmClient
    ) -> None:
        self.bus = bus
        self.realm = client.realm
        self.realm_state = state
        self.registry = registry
        self.client = client

    async def run_task(
        self, capability: str, input: Any, *, timeout: float | None, priority: str, node: str | None
    ) -> Any:
        handle = await self.client.submit(
            capability,
            input,
            timeout=timeout,
            priority=priority,
            stream=False,
            constraints=Constraints(node=node),
        )
        try:
            return await handle.result()
        except TaskFailed as exc:
            raise StepFailed(exc.code, str(exc)) from exc
        except asyncio.CancelledError:
            await handle.cancel("workflow step cancelled")
            raise

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        await self.bus.publish(topic, payload, qos=qos, retain=retain, wait=False)

    async def set_state(self, key: str, value: Any, by: str) -> None:
        try:
            await self.realm_state.set(key, value, by)
        except StateError as exc:
            raise StepFailed(exc.code, str(exc)) from exc

    def state(self) -> Mapping[str, Any]:
        return self.realm_state.snapshot()

    def has_capability(self, name: str) -> bool:
        return self.registry.capable_online(name)


class RealmWorkflows:
    """The orchestrator's workflow engine (non-local workflows of its config)."""

    def __init__(
        self,
        config: Config,
        bus: Bus,
        *,
        state: RealmStateStore,
        registry: Registry,
        store: Store,
        admission: Admission,
    ) -> None:
        self.bus = bus
        self.realm = config.realm
        self.registry = registry
        self.store = store
        self.admission = admission
        every = load_workflows(config)  # a bad workflows_dir file stops the start-up
        flows = {n: w for n, w in every.items() if not w.local}
        self.local_names = {n for n, w in every.items() if w.local}  # answered by their node
        self.client = RealmClient(bus, self.realm, user=WORKFLOW_USER, account=ORCHESTRATOR_ACCOUNT)
        self.engine = Engine(
            bus,
            self.realm,
            flows,
            RealmPorts(bus, state, registry, self.client),
            state,
            where="orchestrator",
            record=store.record_run,
        )
        self.local_runs = LocalRunRecorder(store.record_run, here="orchestrator")

    async def start(self) -> None:
        await self.client.start()
        await self.engine.start()
        realm = self.realm
        await self.bus.subscribe(topics.WORKFLOW_REQUEST.filter(realm=realm), self.on_request)
        await self.bus.subscribe(
            topics.WORKFLOW_EVENT.filter(realm=realm), self.local_runs.on_event
        )

    async def stop(self) -> None:
        await self.engine.stop()

    def _runs_elsewhere(self, name: str | None) -> bool:
        """A local workflow: named local in our config, or advertised by a live node."""
        if name is None or name in self.engine.flows:
            return False
        if name in self.local_names:
            return True
        return any(
            p.online and p.info is not None and name in p.info.workflows
            for p in self.registry.peers.values()
        )

    def _identify(self, account: str, req: WorkflowRequest) -> tuple[str, str]:
        """Who asks, as for task submissions (the topic's account, bans)."""
        from daemon.orchestrator.identity import Refused

        try:
            ident = self.admission.identify(account, req.token, req.user)
        except Refused as exc:
            raise EngineError(exc.code, str(exc)) from exc
        return ident.name, ident.role

    def _hand_to_node(self, req: WorkflowRequest, user: str) -> dict[str, Any]:
        """A local workflow runs on its node: the request, checked here, goes on under the
        orchestrator's own identity (nodes take runs only from it); answered here."""
        run_id = uuid.uuid4().hex[:16]
        forward = WorkflowRequest(
            op="run", name=req.name, input=req.input, user=user, run_id=run_id
        )
        topic = topics.WORKFLOW_REQUEST.build(realm=self.realm, user=ORCHESTRATOR_ACCOUNT)
        self.bus.post(topic, forward)
        return {"run_id": run_id, "workflow": req.name, "where": "node"}

    async def on_request(self, msg: Inbound) -> None:
        account = self.admission.request_account(msg, topics.WORKFLOW_REQUEST, "workflow")
        if account is None:
            return
        reply_topic = msg.response_topic
        correlation = None
        try:
            req = decode(msg.payload, WorkflowRequest)
            if account == ORCHESTRATOR_ACCOUNT and req.run_id is not None:
                return  # our own hand-on of a run to a node (_hand_to_node), not a request
            correlation = req.correlation
            reply_topic = reply_topic or req.reply_to
            user, role = self._identify(account, req)
            if req.op == "run":
                if req.name is None:
                    raise EngineError("bad_request", "run needs a workflow name")
                if role in ("guest", "homeassistant"):
                    raise EngineError("forbidden", f"a {role} may not start workflows")
                if self._runs_elsewhere(req.name):
                    result: Any = self._hand_to_node(req, user)
                else:
                    run_id = self.engine.start_manual(req.name, req.input, user)
                    result = {"run_id": run_id, "workflow": req.name}
            elif req.op == "list":
                result = self.engine.summary()
            else:
                result = await self.store.workflow_runs(req.limit, req.name)
            reply = WorkflowReply(ok=True, result=result, correlation=correlation)
        except MessageError as exc:
            log.warning("bad workflow request: %s (%s)", exc, msg.preview())
            reply = WorkflowReply(ok=False, error=str(exc), code=exc.code)
        except EngineError as exc:
            log.info("workflow request refused: %s", exc)
            reply = WorkflowReply(ok=False, error=str(exc), code=exc.code, correlation=correlation)
        if self.admission.reply_ok(reply_topic, account):
            self.bus.post(reply_topic, reply, correlation_data=msg.correlation_data)
