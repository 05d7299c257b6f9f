"""The gateway's MQTT side: one bus, a realm client per logged-in user, the hub's feeds.

Every task and request goes out under the gateway's broker account with the
user's API token in it (``TaskSubmit.token``, ``AdminRequest.token``,
``WorkflowRequest.token``): the orchestrator serves a ``gateway`` account only
for a valid token and with that token's user and role
(daemon.orchestrator.identity).  Tasks the gateway submitted are tracked here
so HTTP clients can follow them and the hub can show their progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Final

from daemon import topics
from daemon.accounts import GATEWAY_ACCOUNT, account_name
from daemon.bus import Bus, Inbound
from daemon.client import RealmClient, TaskHandle
from daemon.errors import BusError, MessageError, MtorError
from daemon.gateway.auth import Principal
from daemon.gateway.errors import ApiError, from_code
from daemon.gateway.hub import Hub
from daemon.messages import decode
from daemon.protocol.admin import OrchestratorState, OrchestratorStats
from daemon.protocol.node import Event, NodeHealth, NodeInfo, NodeState
from daemon.protocol.task import FINAL_STATUSES, Constraints, TaskUpdate
from daemon.protocol.workflow import WorkflowReply, WorkflowRequest

log = logging.getLogger(__name__)

# Realm clients at most (one per API token that logged in during this run; they
# are kept: a client's subscriptions live as long as the bus).  Tokens are minted
# by sysops, so this is far more than a realm has.
MAX_CLIENTS: Final = 1024
# Tasks remembered for following (the oldest go first), and the updates kept per task
# (a long chat streams a few hundred deltas; past the bound only the final is kept):
# at most ~1M small updates in memory, in practice far fewer.
MAX_TRACKED: Final = 500
MAX_UPDATES: Final = 2000
# Requests per second (and burst) the gateway sends to the orchestrator's admin
# and workflow topics: it rate limits them per account, and an answer over the
# limit is never sent, so the gateway says 429 at once instead of waiting.
REQUEST_RATE: Final = 4.0
REQUEST_BURST: Final = 16
# How long (s) a retained media message may take to arrive after its task's result.
MEDIA_WAIT: Final = 5.0
# Admin views (tasks, stats) cached this long (s) per user.
VIEW_CACHE_S: Final = 0.5


@dataclass(eq=False)
class Tracked:
    """A task the gateway submitted, with every update so far (for followers)."""

    principal: str
    capability: str
    handle: TaskHandle
    submitted: float = field(default_factory=time.time)
    updates: list[TaskUpdate] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    final: TaskUpdate | None = None

    def add(self, update: TaskUpdate) -> None:
        if update.status in FINAL_STATUSES:
            self.final = update
        if len(self.updates) < MAX_UPDATES or update.status in FINAL_STATUSES:
            self.updates.append(update)
        self.changed.set()

    async def follow(self, timeout: float) -> AsyncGenerator[TaskUpdate, None]:
        """Every update from the first, then each as it comes, until the final."""
        # A deadline, not asyncio.timeout(): the generator may be resumed from another
        # task (a streamed response), and a timeout scope would cancel the wrong one.
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.updates):
                update = self.updates[i]
                i += 1
                yield update
                if update.status in FINAL_STATUSES:
                    return
            self.changed.clear()
            if i < len(self.updates):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait_for(self.changed.wait(), remaining)

    def to_json(self) -> dict[str, Any]:
        last = self.updates[-1] if self.updates else None
        final = self.final
        return {
            "task_id": self.handle.task_id,
            "capability": self.capability,
            "user": self.principal,
            "submitted": self.submitted,
            "status": last.status if last else "submitted",
            "node": final.node if final else (last.node if last else None),
            "output": final.output if final else None,
            "error": final.error.model_dump() if final and final.error else None,
            "updates": len(self.updates),
        }


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.level = float(burst)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1:
            return False
        self.level -= 1
        return True


class GatewayRealm:
    def __init__(self, bus: Bus, realm: str, hub: Hub, task_timeout: float) -> None:
        self.bus = bus
        self.realm = realm
        self.hub = hub
        self.task_timeout = task_timeout
        self.account = account_name(bus.config.username, GATEWAY_ACCOUNT)
        self._clients: dict[str, asyncio.Future[RealmClient]] = {}
        self.tracked: OrderedDict[str, Tracked] = OrderedDict()
        self._watchers: set[asyncio.Task[None]] = set()  # and cancels under way
        self._requests = _Bucket(REQUEST_RATE, REQUEST_BURST)
        self._views: dict[tuple[str, str], tuple[float, Any]] = {}
        me = uuid.uuid4().hex[:16]
        self._wf_topic = topics.REPLY.build(realm=realm, user=self.account, rest=f"{me}/workflows")
        self._wf_waiters: dict[bytes, asyncio.Future[WorkflowReply]] = {}

    # ------------------------------------------------------------ the feeds

    async def start(self) -> None:
        r = self.realm
        await self.bus.subscribe(self._wf_topic, self._on_workflow_reply)
        await self.bus.subscribe(topics.NODE_STATE.filter(realm=r), self._on_state)
        await self.bus.subscribe(topics.NODE_INFO.filter(realm=r), self._on_info)
        await self.bus.subscribe(topics.NODE_HEALTH.filter(realm=r), self._on_health)
        await self.bus.subscribe(topics.EVENT.filter(realm=r), self._on_event)
        await self.bus.subscribe(topics.ORCH_STATS.build(realm=r), self._on_stats)
        await self.bus.subscribe(topics.ORCH_STATE.build(realm=r), self._on_orch)
        await self.bus.subscribe(topics.MEDIA.filter(realm=r, stream="+/snapshot"), self._on_snap)

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        for task in list(self._watchers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _on_state(self, msg: Inbound) -> None:
        fields = topics.NODE_STATE.parse(msg.topic)
        if fields is not None:
            state = _decode(msg, NodeState) if msg.payload else None
            if state is not None or not msg.payload:
                self.hub.on_state(fields["node_id"], state)

    async def _on_info(self, msg: Inbound) -> None:
        fields = topics.NODE_INFO.parse(msg.topic)
        if fields is not None:
            self.hub.on_info(fields["node_id"], _decode(msg, NodeInfo) if msg.payload else None)

    async def _on_health(self, msg: Inbound) -> None:
        fields = topics.NODE_HEALTH.parse(msg.topic)
        if fields is not None:
            self.hub.on_health(fields["node_id"], _decode(msg, NodeHealth) if msg.payload else None)

    async def _on_event(self, msg: Inbound) -> None:
        fields = topics.EVENT.parse(msg.topic)
        event = _decode(msg, Event) if fields is not None and msg.payload else None
        if fields is not None and event is not None:
            self.hub.on_event(fields["node_id"], fields["domain"], fields["name"], event)

    async def _on_snap(self, msg: Inbound) -> None:
        fields = topics.MEDIA.parse(msg.topic)
        if fields is None:
            return
        camera = fields["stream"].removesuffix("/snapshot")
        self.hub.on_snapshot(fields["node_id"], camera, msg.payload, msg.content_type or "")

    async def _on_stats(self, msg: Inbound) -> None:
        stats = _decode(msg, OrchestratorStats) if msg.payload else None
        if stats is not None:
            self.hub.on_stats(stats.model_dump(mode="json", exclude={"type", "v"}))

    async def _on_orch(self, msg: Inbound) -> None:
        state = _decode(msg, OrchestratorState) if msg.payload else None
        if state is not None:
            self.hub.on_orchestrator(state.model_dump(mode="json", exclude={"type", "v"}))

    # ---------------------------------------------------------------- tasks

    async def client(self, p: Principal) -> RealmClient:
        """The realm client that acts for ``p`` (its token goes in every request)."""
        key = hashlib.sha256(p.token.encode()).hexdigest()
        made = self._clients.get(key)
        if made is not None:  # made, or being started by a request a moment ago
            return await asyncio.shield(made)
        if len(self._clients) >= MAX_CLIENTS:
            raise ApiError(503, "overloaded", "the gateway serves too many API tokens at once")
        made = self._clients[key] = asyncio.get_running_loop().create_future()
        client = RealmClient(self.bus, self.realm, user=p.name, token=p.token, account=self.account)
        try:
            await client.start()  # its reply topics are subscribed before anything is sent
        except BaseException:
            del self._clients[key]
            made.cancel()
            raise
        made.set_result(client)
        return client

    async def submit(
        self,
        p: Principal,
        capability: str,
        input: Any,
        *,
        timeout: float | None = None,
        priority: str = "interactive",
        progress: bool = False,
        constraints: Constraints | None = None,
        task_id: str | None = None,
    ) -> Tracked:
        client = await self.client(p)
        handle = await client.submit(
            capability,
            input,
            priority=priority,
            timeout=min(timeout or self.task_timeout, self.task_timeout),
            progress=progress,
            constraints=constraints,
            task_id=task_id,
        )
        tracked = Tracked(p.name, capability, handle)
        self.tracked[handle.task_id] = tracked
        while len(self.tracked) > MAX_TRACKED:
            oldest = next(iter(self.tracked))
            self.tracked.pop(oldest)
        watcher = asyncio.create_task(self._watch(tracked))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return tracked

    async def _watch(self, tracked: Tracked) -> None:
        """Take the task's updates into its record and the hub, until its final (or the
        longest any task may take)."""
        try:
            async with asyncio.timeout(self.task_timeout + 10):
                async for update in tracked.handle:
                    tracked.add(update)
                    self.hub.on_task(tracked.principal, tracked.capability, update)
        except TimeoutError:
            tracked.add(TaskUpdate(task_id=tracked.handle.task_id, status="failed"))
            tracked.handle.client.pending.pop(tracked.handle.task_id, None)

    async def result(self, tracked: Tracked, timeout: float | None = None) -> Any:
        """The output of a done task; :class:`ApiError` otherwise."""
        wait = min(timeout or self.task_timeout, self.task_timeout) + 5
        try:
            async for update in tracked.follow(wait):
                if update.status in FINAL_STATUSES:
                    return output_of(update)
        except TimeoutError as exc:
            raise ApiError(504, "timeout", "no answer from the realm in time") from exc
        raise ApiError(504, "timeout", "no answer from the realm in time")

    async def call(self, p: Principal, capability: str, input: Any, **kw: Any) -> Any:
        return await self.result(await self.submit(p, capability, input, **kw), kw.get("timeout"))

    def find(self, p: Principal, task_id: str) -> Tracked:
        tracked = self.tracked.get(task_id)
        if tracked is None or (tracked.principal != p.name and not p.sysop):
            raise ApiError(404, "not_found", f"no task {task_id!r} submitted through the gateway")
        return tracked

    async def cancel(self, p: Principal, task_id: str, reason: str) -> None:
        client = await self.client(p)
        await client.cancel(task_id, reason)

    def cancel_soon(self, p: Principal, tracked: Tracked, reason: str) -> None:
        """Cancel a task nobody waits for any more (its HTTP client went away); safe to
        call from a ``finally`` of a cancelled request."""
        if tracked.final is not None:
            return
        task = asyncio.get_running_loop().create_task(
            self.cancel(p, tracked.handle.task_id, reason)
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # --------------------------------------------------- media (stt, tts, imagine)

    async def transcribe(self, p: Principal, pcm: bytes, language: str | None) -> Any:
        """stt: the audio retained on the gateway's own media topic, the task naming it."""
        from daemon.gateway import audio

        media = topics.MEDIA.build(
            realm=self.realm, node_id=self.account, stream=f"stt/{uuid.uuid4().hex}"
        )
        await self.bus.publish(media, pcm, retain=True, content_type=audio.CONTENT_TYPE)
        try:
            return await self.call(
                p, "stt", {"media_topic": media, "language": language}, timeout=60
            )
        finally:
            with contextlib.suppress(BusError):
                await self.bus.publish(media, b"", retain=True, wait=False)

    async def speak(self, p: Principal, text: str, constraints: Constraints | None) -> bytes:
        """tts: its audio chunks (media/<node>/tts/<task_id>) joined, as PCM."""
        task_id = uuid.uuid4().hex
        chunks: list[bytes] = []
        arrived = asyncio.Event()
        media = topics.MEDIA.filter(realm=self.realm, stream=f"tts/{task_id}")

        async def on_chunk(msg: Inbound) -> None:
            chunks.append(msg.payload)
            arrived.set()

        await self.bus.subscribe(media, on_chunk)
        try:
            out = await self.call(
                p, "tts", {"text": text}, constraints=constraints, task_id=task_id, timeout=60
            )
            want = int(out.get("chunks", 0)) if isinstance(out, dict) else 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(MEDIA_WAIT):
                    while len(chunks) < want:
                        arrived.clear()
                        await arrived.wait()
        finally:
            await self.bus.unsubscribe(media)
        if not chunks:
            raise ApiError(502, "backend_error", "the tts node sent no audio")
        return b"".join(chunks)

    async def media(self, topic: str) -> tuple[bytes, str | None]:
        """The retained message on a media topic of this realm (an imagined picture)."""
        fields = topics.MEDIA.parse(topic) if isinstance(topic, str) else None
        if fields is None or fields["realm"] != self.realm:
            raise ApiError(502, "bad_output", "the node named no media topic of this realm")
        got: asyncio.Future[Inbound] = asyncio.get_running_loop().create_future()

        async def on_media(msg: Inbound) -> None:
            if msg.payload and not got.done():
                got.set_result(msg)

        await self.bus.subscribe(topic, on_media)
        try:
            async with asyncio.timeout(MEDIA_WAIT):
                msg = await got
        except TimeoutError as exc:
            raise ApiError(504, "timeout", "the picture did not arrive") from exc
        finally:
            await self.bus.unsubscribe(topic)
        return msg.payload, msg.content_type

    # ------------------------------------------------- admin and workflows

    def _allow_request(self) -> None:
        if not self._requests.take():
            raise ApiError(429, "rate_limited", "too many realm requests; try again shortly")

    async def admin(
        self, p: Principal, op: str, args: dict[str, Any] | None = None, *, cache: bool = False
    ) -> Any:
        """An admin request as ``p`` (the orchestrator checks the token and the role)."""
        args = args or {}
        if "op" in args or "timeout" in args:
            raise ApiError(400, "bad_request", "'op' and 'timeout' are not admin arguments")
        key = (p.token, op)
        if cache:
            hit = self._views.get(key)
            if hit is not None and time.monotonic() - hit[0] < VIEW_CACHE_S:
                return hit[1]
        self._allow_request()
        client = await self.client(p)
        try:
            result = await client.admin(op, timeout=5.0, **args)
        except MtorError as exc:
            raise _admin_error(str(exc)) from exc
        if cache:
            if len(self._views) > 4 * MAX_CLIENTS:
                self._views.clear()
            self._views[key] = (time.monotonic(), result)
        return result

    async def workflows(self, p: Principal, op: str, **fields: Any) -> Any:
        self._allow_request()
        correlation = uuid.uuid4().hex.encode()
        fut: asyncio.Future[WorkflowReply] = asyncio.get_running_loop().create_future()
        self._wf_waiters[correlation] = fut
        req = WorkflowRequest(op=op, user=p.name, token=p.token, **fields)
        try:
            await self.bus.publish(
                topics.WORKFLOW_REQUEST.build(realm=self.realm, user=self.account),
                req,
                response_topic=self._wf_topic,
                correlation_data=correlation,
            )
            async with asyncio.timeout(5.0):
                reply = await fut
        except TimeoutError as exc:
            raise ApiError(504, "timeout", "no answer from the orchestrator") from exc
        finally:
            self._wf_waiters.pop(correlation, None)
        if not reply.ok:
            raise from_code(reply.code or "bad_request", reply.error or "refused")
        return reply.result

    async def _on_workflow_reply(self, msg: Inbound) -> None:
        fut = self._wf_waiters.get(msg.correlation_data or b"")
        if fut is None or fut.done():
            return
        reply = _decode(msg, WorkflowReply)
        if reply is not None:
            fut.set_result(reply)


def _decode(msg: Inbound, kind: type[Any]) -> Any:
    try:
        return decode(msg.payload, kind)
    except MessageError as exc:
        log.debug("ignored %s: %s", msg.topic[:200], exc)
        return None


def output_of(update: TaskUpdate) -> Any:
    """The output of a final update; :class:`ApiError` for a failed or cancelled one."""
    if update.status == "done":
        return update.output
    err = update.error
    if err is None:
        raise ApiError(504, "timeout", "the task did not finish in time")
    raise from_code(err.code, err.message)


def _admin_error(text: str) -> ApiError:
    code, sep, message = text.partition(": ")
    if sep and code.replace("_", "").isalpha() and code.islower():
        return from_code(code, message)
    return ApiError(504, "timeout", text)
