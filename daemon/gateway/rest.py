"""The realm's REST API (``/api``): nodes, tasks, events, history, stats, workflows, admin.

Reads of the live picture (nodes, capabilities, events, stats) come from the
gateway's own subscriptions; tasks, history, workflows and admin are requests
to the orchestrator as the token's user, which checks the rights again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from daemon.gateway.errors import ApiError
from daemon.gateway.ports import PortsDep, Sysop, User
from daemon.gateway.realm import Tracked
from daemon.protocol.common import NAME_RE
from daemon.protocol.task import CAPABILITY_RE, TASK_ID_RE, Constraints

router = APIRouter(prefix="/api", tags=["realm"])

NodeId = Annotated[str, Path(pattern=NAME_RE, max_length=128)]
TaskId = Annotated[str, Path(pattern=TASK_ID_RE)]
WorkflowName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskRequest(_Strict):
    capability: str = Field(pattern=CAPABILITY_RE, examples=["echo"])
    input: Any = Field(default=None, description="The capability's input (any JSON).")
    priority: Literal["alarm", "interactive", "batch"] = "interactive"
    timeout: float | None = Field(default=None, gt=0, le=3600, description="Seconds.")
    node: str | None = Field(default=None, pattern=NAME_RE, description="Pin to this node.")
    progress: bool = Field(default=False, description="Also queued/assigned/started updates.")
    wait: bool = Field(default=False, description="Answer with the result (else 202 at once).")


class AdminRequestIn(_Strict):
    args: dict[str, Any] = Field(default_factory=dict)


class WorkflowRun(_Strict):
    input: Any = None


AdminOpName = Literal[
    "users",
    "user_add",
    "user_remove",
    "ban",
    "unban",
    "drain",
    "undrain",
    "blacklist",
    "unblacklist",
    "cancel",
]


# ------------------------------------------------------------- the picture


@router.get("/whoami", summary="The user of the API token")
async def whoami(who: User) -> dict[str, Any]:
    return {"name": who.name, "role": who.role}


@router.get("/nodes", summary="Every node the realm knows: presence, advert, health")
async def nodes(ports: PortsDep, who: User) -> list[dict[str, Any]]:
    return [v.to_json() for v in ports.hub.nodes.values()]


@router.get("/nodes/{node_id}", summary="One node")
async def node(node_id: NodeId, ports: PortsDep, who: User) -> dict[str, Any]:
    view = ports.hub.nodes.get(node_id)
    if view is None:
        raise ApiError(404, "not_found", f"no node {node_id!r}")
    return view.to_json()


@router.get("/capabilities", summary="Capabilities online nodes offer, and who offers them")
async def capabilities(ports: PortsDep, who: User) -> dict[str, list[dict[str, Any]]]:
    return ports.hub.capabilities()


@router.get("/stats", summary="The orchestrator's latest statistics")
async def stats(ports: PortsDep, who: User) -> dict[str, Any]:
    return {"stats": ports.hub.stats, "orchestrator": ports.hub.orchestrator}


@router.get("/events", summary="Recent events (not for guests)")
async def events(
    ports: PortsDep, who: User, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[dict[str, Any]]:
    if not who.sees_events:
        raise ApiError(403, "forbidden", "guests see no events")
    return list(ports.hub.events)[-limit:]


@router.get("/snapshots", summary="Cameras' latest snapshots (not for guests)")
async def snapshots(ports: PortsDep, who: User) -> list[dict[str, Any]]:
    if not who.sees_events:
        raise ApiError(403, "forbidden", "guests see no camera pictures")
    return [s.to_json() for s in ports.hub.snapshots.values()]


@router.get(
    "/snapshots/{node_id}/{camera}",
    summary="A camera's latest snapshot (the image)",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def snapshot(node_id: NodeId, camera: NodeId, ports: PortsDep, who: User) -> Response:
    if not who.sees_events:
        raise ApiError(403, "forbidden", "guests see no camera pictures")
    snap = ports.hub.snapshots.get((node_id, camera))
    if snap is None:
        raise ApiError(404, "not_found", f"no snapshot of {node_id}/{camera}")
    return Response(snap.data, media_type=snap.content_type, headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------- tasks


@router.post(
    "/tasks",
    summary="Submit a task; 202 with its id, or its result with wait=true",
    status_code=202,
)
async def submit(req: TaskRequest, ports: PortsDep, who: User) -> dict[str, Any]:
    constraints = Constraints(node=req.node) if req.node else None
    tracked = await ports.realm.submit(
        who,
        req.capability,
        req.input,
        timeout=req.timeout,
        priority=req.priority,
        progress=req.progress,
        constraints=constraints,
    )
    if req.wait:
        output = await ports.realm.result(tracked, req.timeout)
        return {**tracked.to_json(), "output": output}
    return tracked.to_json()


@router.get("/tasks", summary="The live queue (a sysop sees everyone's, others their own)")
async def tasks(ports: PortsDep, who: User) -> Any:
    return await ports.realm.admin(who, "tasks", cache=True)


@router.get("/tasks/{task_id}", summary="A task submitted through the gateway")
async def task(task_id: TaskId, ports: PortsDep, who: User) -> dict[str, Any]:
    return ports.realm.find(who, task_id).to_json()


@router.get(
    "/tasks/{task_id}/events",
    summary="Follow a task: its updates as server-sent events, from the first to the final",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow(task_id: TaskId, ports: PortsDep, who: User) -> StreamingResponse:
    tracked = ports.realm.find(who, task_id)
    return StreamingResponse(
        _sse_updates(tracked, ports.cfg.task_timeout + 5),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _sse_updates(tracked: Tracked, timeout: float) -> AsyncIterator[bytes]:
    try:
        async for update in tracked.follow(timeout):
            doc = update.model_dump(mode="json", exclude={"key"})
            yield f"event: {update.status}\ndata: {json.dumps(doc)}\n\n".encode()
    except TimeoutError:
        yield b'event: timeout\ndata: {"status": "timeout"}\n\n'


@router.delete("/tasks/{task_id}", summary="Cancel a task (yours; a sysop's: anyone's)")
async def cancel(task_id: TaskId, ports: PortsDep, who: User) -> dict[str, Any]:
    tracked = ports.realm.tracked.get(task_id)
    if who.sysop and (tracked is None or tracked.principal != who.name):
        return dict(await ports.realm.admin(who, "cancel", {"task_id": task_id}))
    ports.realm.find(who, task_id)
    await ports.realm.cancel(who, task_id, "cancelled over HTTP")
    return {"cancelling": task_id}


@router.get("/history", summary="Finished tasks (sysop)")
async def history(
    ports: PortsDep,
    who: Sysop,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    user: Annotated[str | None, Query(max_length=64)] = None,
    capability: Annotated[str | None, Query(pattern=CAPABILITY_RE)] = None,
) -> Any:
    args: dict[str, Any] = {"limit": limit}
    if user:
        args["user"] = user
    if capability:
        args["capability"] = capability
    return await ports.realm.admin(who, "history", args)


# --------------------------------------------------------------- workflows


@router.get("/workflows", summary="The realm's workflows")
async def workflows(ports: PortsDep, who: User) -> Any:
    return await ports.realm.workflows(who, "list")


@router.post("/workflows/{name}/run", summary="Run a workflow by hand")
async def run_workflow(name: WorkflowName, body: WorkflowRun, ports: PortsDep, who: User) -> Any:
    return await ports.realm.workflows(who, "run", name=name, input=body.input)


@router.get("/workflows/{name}/history", summary="A workflow's recent runs")
async def workflow_history(
    name: WorkflowName,
    ports: PortsDep,
    who: User,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> Any:
    return await ports.realm.workflows(who, "history", name=name, limit=limit)


# ------------------------------------------------------------------- admin


@router.post("/admin/{op}", summary="A sysop operation (drain, blacklist, ban, cancel, users)")
async def admin(op: AdminOpName, body: AdminRequestIn, ports: PortsDep, who: Sysop) -> Any:
    return await ports.realm.admin(who, op, body.args)
