"""The node daemon's event spool: a bounded outbox on disk that outlives the process.

Every event a node daemon publishes goes through here, *write-ahead*: it gets the
node's next sequence number (``seq``, never reused: the high-water mark is stored
with the events) and this boot's id, is appended to a SQLite table by a writer
thread, is handed to the bus in ``seq`` order once written, and is deleted once
the broker has acknowledged it (:meth:`daemon.bus.Bus.publish` with ``wait=True``
waits for that across reconnects).  So an event is on disk from (about) the moment
it was made until the broker has it: a broker that is away, a connection that
drops, a daemon killed with ``-9`` lose nothing that was written (the writer
commits within a loop turn or two); what was spooled is sent, oldest first,
before anything newer.

Why write-ahead rather than "spool only while offline": the sequence number must
be durable before an event leaves the process (a restarted daemon must not reuse
one a consumer has seen), and an event handed to the bus's in-memory outbox just
before a ``kill -9`` would be lost.  Writing every event costs a few microseconds
of loop time and a share of one transaction on the writer thread.  Measured on a
2-core VM (Mosquitto on loopback, a ~120-byte event): ``publish()`` holds the loop
2.7 µs per event in a burst (16 µs for a lone event, encoding included); process
CPU per event end to end (spooled, sent at QoS 2, acknowledged, deleted) is
~64 µs in bursts of 50 (the bus alone at QoS 1: ~13 µs) and ~450 µs for lone
events at 1,000/s, one transaction and thread hop each (the bus alone: ~110 µs)
— at a node's usual few events a second, well under 0.1 % of a core.  With
``synchronous=NORMAL`` in WAL mode a commit is not an fsync (SQLite syncs the WAL
at checkpoints), so a *crash* of the daemon loses nothing written and a *power
cut* loses at most the commits since the last checkpoint (the database stays
consistent); an fsync per event (``synchronous=FULL``) would cost milliseconds on
an SD card.

Events go out at QoS 2 (:data:`EVENT_QOS`): with the bus's resumed session a cut
connection delivers each event exactly once; across a daemon restart the new
process has no session, so an event the broker had taken just before the old
one died (unacknowledged on our side) is sent again: consumers drop it by its
``(boot_id, seq)``.

Bounds (:data:`MAX_EVENTS`, :data:`MAX_BYTES`): when the spool is full the
*oldest events not yet handed to the bus* are dropped (the newest is what a
consumer wants first, and a gap in ``seq`` tells it exactly what it missed),
counted (``spool.dropped`` in health) and logged once per burst.  At most
:data:`WINDOW` events are handed to the bus at a time, and only while it is
connected, so what waits while the broker is away waits here, not in memory.

The event loop never touches the disk: SQLite runs on one thread of its own,
in order (a write and a read never race; :mod:`daemon.spoolfile`), and the loop
only appends to a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from daemon.errors import BusPublishError
from daemon.messages import encode
from daemon.mqtt.connection import SESSION_MESSAGES
from daemon.protocol.node import Event
from daemon.spoolfile import Row, SpoolFile

if TYPE_CHECKING:
    from daemon.bus import Bus

T = TypeVar("T")

log = logging.getLogger(__name__)

# Bounds of the spool (rows on disk, and their topic + payload bytes).  A day of a
# busy node's events at 1/s fits; a Pi's SD card does not notice 32 MiB.
MAX_EVENTS: Final = 100_000
MAX_BYTES: Final = 32 * 1024 * 1024
# Events handed to the bus and not yet acknowledged: enough to fill a LAN's round
# trip many times over (replay runs at ~WINDOW per round trip), small enough that
# what waits for a broker that is away waits on disk (and can be dropped oldest
# first), not in the bus's memory.  At most half of the spool's own bound.
WINDOW: Final = 256
# Rows per transaction (and per read) at most.
BATCH: Final = 1024
EVENT_QOS: Final = 2
# The bus outbox must have this much room (bytes; the largest JSON message) before
# an event is handed to it without waiting: see Spool._forward, why.
ROOM_MARGIN: Final = 1 << 20
# After a failed write (disk full, I/O error) the writer tries again this much later.
WRITE_RETRY: Final = 1.0
# A burst of drops ends once the spool is below this share of its bounds.
BURST_END: Final = 0.9
# Acknowledged events are deleted with the next events written, or this long (s)
# after the first acknowledgement when no new event comes: one transaction for many.
# A daemon killed meanwhile sends them again at its next start (at least once).
ACK_FLUSH_DELAY: Final = 0.25
# Refused events: each of the first ones gets a log line, then every 1000th.
LOGGED_REFUSALS: Final = 10
# How often close() looks whether everything was acknowledged (only while closing).
CLOSE_POLL: Final = 0.01


def spool_path(state_dir: Path, realm: str, node_id: str) -> Path:
    """Where a node's spool lives: one file per (realm, node id), since the
    sequence is per node.  Realm and node id are config names (no ``/``, no
    leading dot: ``daemon.config.NAME_RE``)."""
    return state_dir / "spool" / realm / f"{node_id}.sqlite"


class EventSpool:
    """The write-ahead outbox of one node daemon's events (see the module docstring).

    ``open()`` (reads the high-water mark), ``start(bus)``, then :meth:`publish`
    from the loop; ``close()`` waits (bounded) for what is handed to the bus and
    writes what is left.
    """

    def __init__(
        self,
        path: Path,
        boot_id: str,
        *,
        max_events: int = MAX_EVENTS,
        max_bytes: int = MAX_BYTES,
        window: int = WINDOW,
    ) -> None:
        self.path = path
        self.boot_id = boot_id
        self.max_events = max(1, max_events)
        self.max_bytes = max_bytes
        self.window = max(1, min(window, self.max_events // 2))
        self.dropped = 0
        self.refused = 0
        self.write_errors = 0
        # Loop side.
        self._next = 0  # the next seq (0: not open)
        self._pending: list[Row] = []  # made, not yet written
        self._acked: list[tuple[int, int]] = []  # (seq, size) acknowledged, not yet deleted
        self._committed = 0  # highest seq written
        self._read = 0  # highest seq the forwarder has taken
        self._events = 0  # rows written (on disk) and their bytes
        self._bytes = 0
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._unhanded = 0  # taken by the forwarder, not yet handed to the bus
        self._ready: deque[Row] = deque()  # taken straight from the writer, not yet handed
        self._ack_timer: asyncio.TimerHandle | None = None
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._burst = 0  # drops in the current burst (0: not full)
        self._wrote = asyncio.Event()  # the writer has something to do
        self._more = asyncio.Event()  # the forwarder may have something to do
        self._tasks: list[asyncio.Task[None]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._closed = False
        self._bus: Bus | None = None
        # Writer-thread side: only ever touched by the one thread, in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtor-spool")
        self._file = SpoolFile(path, max_events=self.max_events, max_bytes=max_bytes)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open (or create) the spool; what it holds will be sent first."""
        self._next, self._committed, self._events, self._bytes = await self._call(self._file.open)
        if self._events:
            log.info(
                "event spool %s holds %d events (%d bytes) from before: sending them first",
                self.path,
                self._events,
                self._bytes,
            )

    def start(self, bus: Bus) -> None:
        """Start the writer and the forwarder (after :meth:`open`)."""
        self._bus = bus
        self._tasks = [
            asyncio.create_task(self._writer(), name="spool-writer"),
            asyncio.create_task(self._forwarder(bus), name="spool-forwarder"),
        ]
        for task in self._tasks:
            task.add_done_callback(_crashed)

    async def close(self, timeout: float = 2.0) -> None:
        """Wait up to ``timeout`` for every event to be acknowledged, then write what
        is left (unacknowledged events stay for the next start) and close."""
        self._closed = True
        bus = self._bus
        if self._tasks and bus is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    # Only while connected: what the broker cannot take now waits on disk.
                    while bus.connected and (
                        self._pending
                        or self._inflight
                        or self._unhanded
                        or self._ready
                        or self._read < self._next - 1
                    ):
                        self._more.set()
                        await asyncio.sleep(CLOSE_POLL)
        if self._inflight or self._pending or self._read < self._next - 1:
            log.info(
                "event spool: %d events not acknowledged at close (%d in flight); they go "
                "out at the next start",
                self._events + len(self._pending),
                len(self._inflight),
            )
        for task in [*self._tasks, *self._inflight.values()]:
            task.cancel()
        for task in [*self._tasks, *self._inflight.values()]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for waiter in self._waiters.values():
            waiter.cancel()
        if self._flushing is not None:  # a transaction under way finishes first
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._flushing
        if self._file.is_open:
            with contextlib.suppress(sqlite3.Error, OSError):
                while self._pending or self._acked:
                    await self._flush()
            await self._call(self._file.close)
        self._end_burst()
        self._thread.shutdown(wait=False)

    # ---------------------------------------------------------------- publish

    async def publish(
        self, topic: str, event: Event, *, retain: bool = False, wait: bool = False
    ) -> int:
        """Stamp ``event`` with the next ``seq`` and this boot's id and spool it;
        never waits for the disk or the broker unless ``wait`` (then: until the
        broker has acknowledged it).  Returns its ``seq``."""
        if not self._next:
            raise RuntimeError("the event spool is not open")
        seq = self._next
        self._next += 1
        event.seq = seq
        event.boot_id = self.boot_id
        self._pending.append(Row(seq, topic, encode(event), retain))
        if len(self._pending) > self.max_events:  # the disk is failing: memory is bounded too
            del self._pending[0]
            self._count_drop(1, seq)
        self._wrote.set()
        if not wait:
            return seq
        waiter = self._waiters[seq] = asyncio.get_running_loop().create_future()
        await waiter
        return seq

    @property
    def durable(self) -> bool:
        """On disk (False: in memory only, the file could not be used)."""
        return self._file.durable

    def stats(self) -> dict[str, int]:
        """Counters for health reports."""
        return {
            "events": self._events + len(self._pending),
            "bytes": self._bytes + sum(r.size for r in self._pending),
            "in_flight": len(self._inflight),
            "dropped": self.dropped,
            "refused": self.refused,
            "write_errors": self.write_errors,
            "last_seq": self._next - 1 if self._next else 0,
        }

    # ----------------------------------------------------------------- writer

    async def _writer(self) -> None:
        while True:
            await self._wrote.wait()
            self._wrote.clear()
            # Shielded: a transaction handed to the thread is waited for to the end
            # (cancelled half-way, the loop would not know whether it was written).
            self._flushing = asyncio.ensure_future(self._flush())
            try:
                await asyncio.shield(self._flushing)
            except (sqlite3.Error, OSError) as exc:
                self.write_errors += 1
                if self.write_errors in (1, 10, 100) or self.write_errors % 1000 == 0:
                    log.error(  # noqa: TRY400 - the cause in one line; no traceback per retry
                        "event spool %s: write failed (%s); events wait in memory "
                        "(%d failures so far)",
                        self.path,
                        exc,
                        self.write_errors,
                    )
                await asyncio.sleep(WRITE_RETRY)
                self._wrote.set()
            self._flushing = None

    async def _flush(self) -> None:
        """One transaction: what was made and what was acknowledged since the last."""
        rows, self._pending = self._pending[:BATCH], self._pending[BATCH:]
        acked, self._acked = self._acked, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if not rows and not acked:
            return
        # What the forwarder could take at once: it need not read these back.
        direct = 0
        bus = self._bus
        if bus is not None and bus.connected and rows:
            direct = self.window - len(self._inflight) - self._unhanded - len(self._ready)
        try:
            written = await self._call(self._file.write, rows, acked, direct)
        except (sqlite3.Error, OSError):
            self._pending[:0] = rows  # written again, in order, next time
            self._acked[:0] = acked
            raise
        if rows:
            self._committed = rows[-1].seq
        if written.direct:
            self._ready.extend(written.direct)
            self._read = written.direct[-1].seq
        self._events, self._bytes = written.events, written.bytes
        if written.dropped:
            self._count_drop(written.dropped, written.dropped_last)
        elif self._burst and (
            self._events < self.max_events * BURST_END and self._bytes < self.max_bytes * BURST_END
        ):
            self._end_burst()
        if self._pending:
            self._wrote.set()
        self._more.set()

    def _count_drop(self, n: int, last: int) -> None:
        self.dropped += n
        if not self._burst:
            log.warning(
                "event spool full (%d events / %d bytes at most): dropping the oldest unsent "
                "events (up to seq %d); consumers see the gap",
                self.max_events,
                self.max_bytes,
                last,
            )
        self._burst += n

    def _end_burst(self) -> None:
        if self._burst:
            log.warning(
                "event spool: %d oldest events were dropped while it was full (%d in all)",
                self._burst,
                self.dropped,
            )
            self._burst = 0

    # -------------------------------------------------------------- forwarder

    async def _forwarder(self, bus: Bus) -> None:
        while True:
            await bus.wait_connected()
            room = self.window - len(self._inflight)
            if room <= 0 or (not self._ready and self._read >= self._committed):
                self._more.clear()
                await self._more.wait()
                continue
            if self._ready:
                rows = [self._ready.popleft() for _ in range(min(room, len(self._ready)))]
            else:
                try:
                    rows, read = await self._call(self._file.take, min(room, BATCH))
                except (sqlite3.Error, OSError) as exc:
                    self.write_errors += 1
                    log.error("event spool %s: read failed (%s); trying again", self.path, exc)  # noqa: TRY400
                    await asyncio.sleep(WRITE_RETRY)
                    continue
                self._read = max(self._read, read)
                if self._ready:
                    # Written (and taken) while this read waited: the thread ran those
                    # writes first, so they come before what the read found.
                    rows[:0] = self._ready
                    self._ready.clear()
            self._unhanded = len(rows)
            for row in rows:
                await self._hand(bus, row)
                self._unhanded -= 1

    async def _hand(self, bus: Bus, row: Row) -> None:
        """Hand one event to the bus, in seq order.

        ``Bus.publish`` waits for room in the bus's outbox before the event enters it;
        two events waiting there at once could enter in the other order (a smaller one
        fits first).  So an event is handed in a task of its own only while the outbox
        clearly has room; otherwise the forwarder waits for this one itself."""
        task = asyncio.create_task(self._send(bus, row), name=f"spool-send-{row.seq}")
        self._inflight[row.seq] = task
        stats = bus.stats()
        limit = bus.config.outbox_size or SESSION_MESSAGES
        if (
            stats["outbox"] + 1 < limit
            and stats["outbox_bytes"] + ROOM_MARGIN < bus.config.outbox_bytes
        ):
            await asyncio.sleep(0)  # its first step (into the outbox) runs before the next's
        else:
            await asyncio.wait([task])

    async def _send(self, bus: Bus, row: Row) -> None:
        try:
            await bus.publish(row.topic, row.payload, qos=EVENT_QOS, retain=row.retain, wait=True)
        except BusPublishError as exc:
            # Refused by the broker (its ACL, its packet size): never deliverable, so not
            # kept to block everything behind it.
            self.refused += 1
            if self.refused <= LOGGED_REFUSALS or self.refused % 1000 == 0:
                log.warning("event %d refused, not kept: %s", row.seq, exc)
        finally:
            self._inflight.pop(row.seq, None)  # before the forwarder wakes: room for the next
        self._acked.append((row.seq, row.size))
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                ACK_FLUSH_DELAY, self._wrote.set
            )
        self._more.set()
        waiter = self._waiters.pop(row.seq, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _crashed(task: asyncio.Task[None]) -> None:
    """A spool task that died of a bug: said at once, not when it is collected."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s died: events are no longer sent", task.get_name(), exc_info=task.exception())
