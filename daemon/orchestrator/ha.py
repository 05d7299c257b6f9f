"""High availability: several orchestrators on one realm, exactly one active.

Standard MQTT 5 only, so it works on any broker (a clustered one too):

* **The lease** (``orchestrator/lease``, retained, QoS 1) says who is active and
  its *epoch*.  The active renews it every ``lease_renew`` seconds.  A standby
  takes over when the active's will says it died (``orchestrator/state``
  offline with the holder's boot id: at once after a kill -9, whose socket the
  kernel closes), or when the lease has not been renewed for ``lease_timeout``
  (a frozen or cut-off active).  To take over it publishes its own lease with an
  epoch above every one it has seen, waits ``SETTLE`` and wins if no higher
  (epoch, holder) came meanwhile; the lease with the highest (epoch, holder)
  always rules, and an active that sees a lower one asserts its own again.
* **Fencing.** Every assignment carries the epoch; a worker that has seen a
  higher one refuses it (``stale_epoch``).  Workers learn the epoch from
  ``orchestrator/state``, which the active publishes when it takes over (the
  lease's renewals go to orchestrators only: at 1,000 nodes a renewal a second to
  every worker was most of the realm's idle traffic).
  An old active that comes back and sees a higher lease steps down: it stops,
  and its supervisor starts it again as a standby.
* **The standby's state** is what it can see: the registry (node adverts and
  health, which every orchestrator follows), and the active's task table, which
  the active replicates on ``orchestrator/journal`` while a standby is online
  (accept / assign / final records; a snapshot when a standby appears).  The
  standby also follows the workers' reports, so a final that arrives while no
  orchestrator is active is not lost: the new active finishes the task with it.
  On taking over, the new active adopts the mirrored tasks — queued ones are
  queued, assigned ones stay with their worker, which re-announces them to the
  new epoch (a worker that does not within ``ack_timeout`` is presumed gone and
  the task retried) — and announces itself, so clients resubmit what they still
  wait for (joined by task id, never run twice by the orchestrator).

Limits (docs/operations.md): what the active accepted in the last moment before
it died and had not yet replicated is recovered only by the client's resubmission;
a standby that starts while tasks are in flight mirrors them from the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import BusError, MessageError
from daemon.messages import decode
from daemon.orchestrator.config import OrchestratorConfig
from daemon.orchestrator.tasks import Mirrored, Task
from daemon.protocol.admin import InstanceState, JournalRecord, OrchestratorLease, OrchestratorState
from daemon.protocol.task import WorkerReport

# Called when this instance becomes active: (the mirrored tasks, took_over).
OnActive = Callable[[dict[str, Mirrored], bool], Awaitable[None]]

log = logging.getLogger(__name__)

# How long a claim waits for competing claims (and a starting orchestrator for the
# retained lease) before it decides (s).
SETTLE: Final = 0.3


def _rank(lease: OrchestratorLease) -> tuple[int, str]:
    return (lease.epoch, lease.holder)


class SteppedDown(Exception):
    """A higher lease rules: this orchestrator stops (and is started again as a standby)."""


class HighAvailability:
    def __init__(
        self,
        cfg: OrchestratorConfig,
        realm: str,
        name: str,
        bus: Bus,
        boot_id: str,
        *,
        tasks: Mapping[str, Task],
        on_active: OnActive,
        offline: tuple[str, OrchestratorState],
    ) -> None:
        """``name``: this instance's; ``tasks``: the active table (replicated to
        standbys); ``offline``: the realm's orchestrator will (topic, state)."""
        self.bus = bus
        self.boot_id = boot_id
        self.realm = realm
        self.tasks = tasks
        self.on_active = on_active
        self.offline = offline
        self.name = name
        self.renew = cfg.lease_renew
        self.timeout = cfg.lease_timeout
        self.lease_topic = topics.ORCH_LEASE.build(realm=realm)
        self.journal_topic = topics.ORCH_JOURNAL.build(realm=realm)
        self.instance_topic = topics.ORCH_INSTANCE.build(realm=realm, name=self.name)
        self.active = False
        self.epoch = 0  # ours, while active
        self.lease: OrchestratorLease | None = None  # the ruling lease, as seen
        self.lease_at = 0.0  # when it was last heard (monotonic)
        self.max_epoch = 0
        self.standbys: set[str] = set()
        self.mirror: dict[str, Mirrored] = {}
        self.stepped_down: OrchestratorLease | None = None
        self._changed = asyncio.Event()
        self._standby_will = False
        self._claiming = 0  # the epoch of a claim not yet decided

    # ------------------------------------------------------------- following

    async def start(self) -> None:
        bus = self.bus
        realm = self.realm
        await bus.subscribe(self.lease_topic, self._on_lease)
        await bus.subscribe(self.journal_topic, self._on_journal)
        await bus.subscribe(topics.ORCH_INSTANCE.filter(realm=realm), self._on_instance)
        await bus.subscribe(topics.ORCH_STATE.build(realm=realm), self._on_orch_state)

    def _ours(self, lease: OrchestratorLease) -> bool:
        return lease.holder == self.name and lease.boot_id == self.boot_id

    async def _on_lease(self, msg: Inbound) -> None:
        try:
            lease = decode(msg.payload, OrchestratorLease)
        except MessageError:
            return
        self.max_epoch = max(self.max_epoch, lease.epoch)
        current = self.lease
        if lease.state == "released":
            if current is None or (current.holder, current.boot_id) == (
                lease.holder,
                lease.boot_id,
            ):
                self.lease, self.lease_at = lease, time.monotonic()
                self._changed.set()
            return
        if current is None or current.state == "released" or _rank(lease) >= _rank(current):
            self.lease, self.lease_at = lease, time.monotonic()
            if self._ours(lease):
                return  # our own, back from the broker: nothing to decide
            if self.active:
                self._step_down(lease)
            self._changed.set()
        elif self.active:
            self._publish_lease()  # a lower claim (a late loser, a stale retained one)

    async def _on_orch_state(self, msg: Inbound) -> None:
        """The active's will: it died, the lease is free at once."""
        try:
            state = decode(msg.payload, OrchestratorState)
        except MessageError:
            return
        lease = self.lease
        if (
            state.state == "offline"
            and lease is not None
            and lease.boot_id == state.boot_id
            and not self._ours(lease)
        ):
            self.lease_at = -1e9
            self._changed.set()

    async def _on_instance(self, msg: Inbound) -> None:
        fields = topics.ORCH_INSTANCE.parse(msg.topic)
        if fields is None or fields["name"] == self.name:
            return
        try:
            state = decode(msg.payload, InstanceState)
        except MessageError:
            return
        name = fields["name"]
        if state.state == "standby":
            if name not in self.standbys and self.active:
                self.standbys.add(name)
                self._snapshot()
            self.standbys.add(name)
        else:
            self.standbys.discard(name)

    async def _on_journal(self, msg: Inbound) -> None:
        if self.active:
            return
        try:
            record = decode(msg.payload, JournalRecord)
        except MessageError:
            return
        lease = self.lease
        if lease is not None and record.epoch < lease.epoch:
            return  # from an active that no longer rules
        if record.op == "accept" and record.doc is not None:
            self.mirror[record.task_id] = Mirrored(record.doc)
        elif record.op == "assign":
            m = self.mirror.get(record.task_id)
            if m is not None:
                m.node, m.attempt, m.final = record.node, record.attempt, None
        elif record.op == "final":
            self.mirror.pop(record.task_id, None)

    def on_report(self, node_id: str, report: WorkerReport) -> None:
        """A worker's report while standby: finals are kept for the next active."""
        m = self.mirror.get(report.task_id)
        if m is None or m.node != node_id or m.attempt != report.attempt:
            return
        if report.status in ("done", "failed"):
            m.final = report
        elif report.status == "rejected":
            m.node = None

    # ------------------------------------------------------------- deciding

    async def run(self) -> None:
        bus = self.bus
        await bus.wait_connected()
        await asyncio.sleep(SETTLE)  # the retained lease, if any, has arrived
        while True:
            if self.stepped_down is not None:
                raise SteppedDown(
                    f"orchestrator {self.stepped_down.holder!r} holds a newer lease "
                    f"(epoch {self.stepped_down.epoch})"
                )
            if self.active:
                self._publish_lease()
                self._changed.clear()
                await self._wait(self.renew)
                continue
            lease = self.lease
            stale = time.monotonic() - self.lease_at > self.timeout
            if (
                lease is None
                or lease.state == "released"
                or stale
                or (lease.holder == self.name and lease.boot_id != self.boot_id)
            ):
                await self._claim()
                continue
            if not self._standby_will:
                await self._be_standby()
            self._changed.clear()
            await self._wait(max(0.05, self.lease_at + self.timeout - time.monotonic()))

    async def lead(self, stop: asyncio.Event) -> None:
        """:meth:`run`, and ``stop`` set when a newer active took over (the service
        then ends with :class:`SteppedDown`)."""
        try:
            await self.run()
        except SteppedDown:
            stop.set()

    async def goodbye(self) -> None:
        """A clean stop: the lease free at once (a standby takes over without waiting),
        and the realm told the orchestrator is offline; a standby's own presence."""
        if not self.bus.connected:
            return
        released = self.release()
        with contextlib.suppress(TimeoutError, BusError):
            async with asyncio.timeout(1.0):
                if released is not None:
                    await self.bus.publish(self.lease_topic, released, retain=True)
                    await self.bus.publish(*self.offline, retain=True)
                offline = self.presence("offline")
                await self.bus.publish(self.instance_topic, offline, retain=True)

    async def _wait(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def _claim(self) -> None:
        epoch = max(self.max_epoch + 1, int(time.time() * 1000))
        mine = self._lease(epoch)
        log.info("claiming the orchestrator lease (epoch %d)", epoch)
        self._claiming = epoch
        await self.bus.publish(self.lease_topic, mine, retain=True)
        await asyncio.sleep(SETTLE)
        self._claiming = 0
        lease = self.lease
        if lease is not None and self._ours(lease) and lease.epoch == epoch:
            await self._become_active(epoch)
        else:
            log.info("another orchestrator won the lease: standing by")

    async def _become_active(self, epoch: int) -> None:
        was_standby = self._standby_will
        self.active, self.epoch = True, epoch
        mirror, self.mirror = self.mirror, {}
        log.info(
            "orchestrator %s active (epoch %d%s)",
            self.name,
            epoch,
            f", {len(mirror)} task(s) taken over" if was_standby else "",
        )
        self._publish_lease()
        await self.bus.publish(self.instance_topic, self.presence("active"), retain=True)
        await self.on_active(mirror, was_standby)
        if was_standby:  # the realm's will again: this one's death says "offline"
            self.bus.set_will(*self.offline)
            self.bus.reconnect()
            self._standby_will = False

    async def _be_standby(self) -> None:
        """Stand by: presence on the instance topic, and the will moves there (a
        standby's death must not say the realm's orchestrator is offline)."""
        self._standby_will = True
        self.bus.set_will(self.instance_topic, self.presence("offline"))
        self.bus.reconnect()
        await self.bus.publish(self.instance_topic, self.presence("standby"), retain=True)
        lease = self.lease
        log.info(
            "orchestrator %s standing by (%s is active)",
            self.name,
            lease.holder if lease else "another",
        )

    def _step_down(self, lease: OrchestratorLease) -> None:
        log.warning(
            "orchestrator %s holds a newer lease (epoch %d > %d): stepping down",
            lease.holder,
            lease.epoch,
            self.epoch,
        )
        self.active = False
        self.stepped_down = lease
        self._changed.set()

    def _lease(self, epoch: int, state: Literal["held", "released"] = "held") -> OrchestratorLease:
        return OrchestratorLease(
            holder=self.name,
            boot_id=self.boot_id,
            epoch=epoch,
            state=state,
            renew_s=self.renew,
        )

    def presence(self, state: Literal["active", "standby", "offline"]) -> InstanceState:
        """This instance's role, for its ``orchestrator/instance/<name>/state``."""
        epoch = self.epoch if state == "active" else 0
        return InstanceState(state=state, boot_id=self.boot_id, epoch=epoch)

    def _publish_lease(self) -> None:
        self.bus.post(self.lease_topic, self._lease(self.epoch), retain=True)

    def release(self) -> OrchestratorLease | None:
        """On a clean shutdown of the active (or of one claiming): the lease is free
        at once, the next one need not wait it out."""
        epoch = self.epoch if self.active else self._claiming
        if not epoch or self.stepped_down is not None:
            return None
        self.active = False
        return self._lease(epoch, "released")

    # ------------------------------------------------------------- replicating

    def _record(self, record: JournalRecord) -> None:
        if self.active and self.standbys:
            self.bus.post(self.journal_topic, record)

    def accepted(self, task: Task) -> None:
        if self.active and self.standbys:
            self._record(self._accept(task))

    def _accept(self, task: Task) -> JournalRecord:
        doc = task.journal_doc()
        if task.submit.reply_key:  # the standby is an orchestrator: it may answer directly
            doc = {**doc, "submit": {**doc["submit"], "reply_key": task.submit.reply_key}}
        return JournalRecord(epoch=self.epoch, op="accept", task_id=task.id, doc=doc)

    def assigned(self, task: Task) -> None:
        if self.active and self.standbys and task.node is not None:
            self._record(
                JournalRecord(
                    epoch=self.epoch,
                    op="assign",
                    task_id=task.id,
                    node=task.node,
                    attempt=task.attempt,
                )
            )

    def finished(self, task_id: str) -> None:
        if self.active and self.standbys:
            self._record(JournalRecord(epoch=self.epoch, op="final", task_id=task_id))

    def _snapshot(self) -> None:
        """A standby appeared: everything it must mirror."""
        for task in list(self.tasks.values()):
            self._record(self._accept(task))
            self.assigned(task)
