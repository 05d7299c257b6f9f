"""A small client for programs: submit tasks, stream their progress, get results.

    async with client_bus(config) as bus:
        realm = RealmClient(bus, config.realm)
        await realm.start()
        print(await realm.call("echo", {"hello": "world"}))

Requests go out under this client's account (``task/submit/<account>``: its
MQTT username, which the realm's broker ACL authenticates), and replies come
on one random topic per client inside that account's reply space
(``reply/<account>/<random>/tasks``), matched by MQTT 5 correlation data.
When the orchestrator restarts (a new boot id online), pending tasks are
submitted again with the same task id — the orchestrator deduplicates, so
each task still ends exactly once.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

from daemon import topics
from daemon.accounts import ANONYMOUS, account_name
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError, MtorError
from daemon.messages import decode
from daemon.protocol.admin import AdminReply, AdminRequest, OrchestratorState
from daemon.protocol.task import FINAL_STATUSES, Constraints, TaskCancel, TaskSubmit, TaskUpdate

log = logging.getLogger(__name__)


class TaskFailed(MtorError):
    def __init__(self, update: TaskUpdate) -> None:
        err = update.error
        super().__init__(f"{err.code}: {err.message}" if err else update.status)
        self.code = err.code if err else update.status
        self.update = update


class TaskHandle:
    def __init__(self, client: RealmClient, submit: TaskSubmit) -> None:
        self.client = client
        self.submit = submit
        self.task_id = submit.task_id or ""
        self.final: TaskUpdate | None = None
        self._final: asyncio.Future[TaskUpdate] = asyncio.get_running_loop().create_future()
        # The queue is made when someone reads it (most callers only await result()).
        self._updates: asyncio.Queue[TaskUpdate] | None = None
        self._early: list[TaskUpdate] = []

    @property
    def updates(self) -> asyncio.Queue[TaskUpdate]:
        """Every update of the task, in order of arrival."""
        if self._updates is None:
            self._updates = asyncio.Queue()
            for update in self._early:
                self._updates.put_nowait(update)
            self._early.clear()
        return self._updates

    def _deliver(self, update: TaskUpdate) -> None:
        if self._updates is None:
            self._early.append(update)
        else:
            self._updates.put_nowait(update)
        if update.status in FINAL_STATUSES and not self._final.done():
            self._final.set_result(update)

    async def __aiter__(self) -> AsyncIterator[TaskUpdate]:
        while self.final is None:
            update = await self.updates.get()
            if update.status in FINAL_STATUSES:
                self.final = update
            yield update

    async def result(self) -> Any:
        """The output of a done task; raises :class:`TaskFailed` otherwise."""
        self.final = await asyncio.shield(self._final)
        if self.final.status != "done":
            raise TaskFailed(self.final)
        return self.final.output

    async def cancel(self, reason: str = "cancelled by the submitter") -> None:
        await self.client.cancel(self.task_id, reason)


class RealmClient:
    def __init__(
        self,
        bus: Bus,
        realm: str,
        *,
        user: str | None = None,
        token: str | None = None,
        origin: str | None = None,
        account: str | None = None,
    ) -> None:
        """``account``: the identity level of this client's topics (default: the bus's
        MQTT username; on a broker without usernames, ``user`` or "anonymous" — a claim).
        ``user``: whom the orchestrator's own account submits for (ignored for others)."""
        self.bus = bus
        self.realm = realm
        self.user = user
        self.token = token
        self.origin = origin
        self.account = account or account_name(bus.config.username, user or ANONYMOUS)
        me = uuid.uuid4().hex[:16]  # not guessable: nobody else predicts the reply topic
        self.reply_topic = topics.REPLY.build(realm=realm, user=self.account, rest=f"{me}/tasks")
        self.admin_topic = topics.REPLY.build(realm=realm, user=self.account, rest=f"{me}/admin")
        # Direct finals from the assigned worker (TaskSubmit.direct): node accounts may
        # write here, so a final counts only with this client's secret reply key.
        self.direct_topic = topics.REPLY.build(realm=realm, user=self.account, rest=f"{me}/direct")
        self._reply_key = secrets.token_urlsafe(24)
        self.forged = 0  # direct finals dropped for a missing or wrong key
        self.submit_topic = topics.TASK_SUBMIT.build(realm=realm, user=self.account)
        self.pending: dict[str, TaskHandle] = {}
        # Task ids: one random prefix per client and a counter (cheaper than uuid4 each).
        self._id_prefix = uuid.uuid4().hex
        self._ids = itertools.count(1)
        self._admin_waiters: dict[bytes, asyncio.Future[AdminReply]] = {}
        self._orch_boot: str | None = None

    async def start(self) -> None:
        await self.bus.subscribe(self.reply_topic, self._on_reply)
        await self.bus.subscribe(self.direct_topic, self._on_direct)
        await self.bus.subscribe(self.admin_topic, self._on_admin_reply)
        await self.bus.subscribe(topics.ORCH_STATE.build(realm=self.realm), self._on_orch)
        self._connects = self.bus.connects
        self.bus.on_connect(self._on_reconnect)

    async def _on_reconnect(self) -> None:
        """Our own connection came back: a clean session lost the subscriptions for a
        moment, and an answer sent meanwhile is gone.  Resubmitting is safe (joined by
        task id; a finished one's final is sent again)."""
        if self.bus.connects > self._connects and self.pending:
            log.info("reconnected: resubmitting %d task(s)", len(self.pending))
            for handle in list(self.pending.values()):
                self._post(handle.submit)
        self._connects = self.bus.connects

    async def _on_reply(self, msg: Inbound) -> None:
        try:
            update = decode(msg.payload, TaskUpdate)
        except MessageError as exc:
            log.warning("bad task update: %s", exc)
            return
        self._route(msg, update)

    def _route(self, msg: Inbound, update: TaskUpdate) -> None:
        """Hand an update to its task (by correlation data, else by task id)."""
        # Correlation data is bytes from the network: never assume it is text.
        corr = msg.correlation_data
        key = corr.decode(errors="replace") if corr else update.task_id
        handle = self.pending.get(key)
        if handle is None:
            return
        if update.status in FINAL_STATUSES:
            self.pending.pop(key, None)
        handle._deliver(update)

    async def _on_direct(self, msg: Inbound) -> None:
        try:
            update = decode(msg.payload, TaskUpdate)
        except MessageError as exc:
            log.warning("bad direct task update: %s", exc)
            return
        if update.key is None or not hmac.compare_digest(update.key, self._reply_key):
            self.forged += 1
            if self.forged in (1, 10, 100) or self.forged % 1000 == 0:
                log.warning(
                    "direct final without this client's reply key dropped (%d)", self.forged
                )
            return
        self._route(msg, update)

    async def _on_orch(self, msg: Inbound) -> None:
        try:
            state = decode(msg.payload, OrchestratorState)
        except MessageError:
            return
        if state.state != "online":
            return
        previous, self._orch_boot = self._orch_boot, state.boot_id
        # Another orchestrator now (restarted, or a standby took over), or the first
        # one this client hears of: what it still waits for may have been lost with
        # the last one.  Resubmitting is safe: the orchestrator joins a task by its id.
        if previous != state.boot_id and self.pending:
            log.info(
                "orchestrator %s online: resubmitting %d task(s)", state.boot_id, len(self.pending)
            )
            for handle in list(self.pending.values()):
                self._post(handle.submit)

    def _post(self, submit: TaskSubmit) -> None:
        # Bus.post: straight to the MQTT client's bounded send queue (no task per
        # submission); kept in the outbox while the broker is away.
        self.bus.post(
            self.submit_topic,
            submit,
            response_topic=self.reply_topic,
            correlation_data=(submit.task_id or "").encode(),
        )

    async def submit(
        self,
        capability: str,
        input: Any = None,
        *,
        priority: str = "interactive",
        timeout: float | None = None,
        progress: bool = False,
        stream: bool = True,
        constraints: Constraints | None = None,
        idempotency_key: str | None = None,
        task_id: str | None = None,
        direct: bool = True,
    ) -> TaskHandle:
        """Submit a task.  ``direct``: the worker may answer ``done`` itself (one hop
        less); a rare second final for the same task is dropped here."""
        submit = TaskSubmit(
            capability=capability,
            input=input,
            task_id=task_id or f"{self._id_prefix}-{next(self._ids)}",
            priority=priority,
            timeout=timeout,
            progress=progress,
            stream=stream,
            direct=direct,
            reply_key=self._reply_key if direct else None,
            constraints=constraints or Constraints(),
            idempotency_key=idempotency_key,
            user=self.user,
            token=self.token,
            origin=self.origin,
        )
        handle = TaskHandle(self, submit)
        self.pending[handle.task_id] = handle
        self._post(submit)
        return handle

    async def call(self, capability: str, input: Any = None, **kw: Any) -> Any:
        handle = await self.submit(capability, input, **kw)
        return await handle.result()

    async def cancel(self, task_id: str, reason: str = "cancelled") -> None:
        msg = TaskCancel(task_id=task_id, user=self.user, token=self.token, reason=reason)
        await self.bus.publish(topics.TASK_CONTROL.build(realm=self.realm, user=self.account), msg)

    async def admin(self, op: str, timeout: float = 5.0, **args: Any) -> Any:
        """A sysop request; returns the result or raises :class:`MtorError`."""
        correlation = uuid.uuid4().hex.encode()
        fut: asyncio.Future[AdminReply] = asyncio.get_running_loop().create_future()
        self._admin_waiters[correlation] = fut
        req = AdminRequest(op=op, args=args, token=self.token, user=self.user)
        try:
            await self.bus.publish(
                topics.ORCH_ADMIN.build(realm=self.realm, user=self.account),
                req,
                response_topic=self.admin_topic,
                correlation_data=correlation,
            )
            async with asyncio.timeout(timeout):
                reply = await fut
        except TimeoutError as exc:
            raise MtorError(f"no answer from the orchestrator within {timeout:g}s") from exc
        finally:
            self._admin_waiters.pop(correlation, None)
        if not reply.ok:
            raise MtorError(f"{reply.code}: {reply.error}")
        return reply.result

    async def _on_admin_reply(self, msg: Inbound) -> None:
        fut = self._admin_waiters.get(msg.correlation_data or b"")
        if fut is None or fut.done():
            return
        try:
            fut.set_result(decode(msg.payload, AdminReply))
        except MessageError as exc:
            fut.set_exception(MtorError(f"bad admin reply: {exc}"))
