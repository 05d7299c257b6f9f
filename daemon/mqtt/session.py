"""The client's side of an MQTT session (:class:`Session`): the QoS 1/2 publishes
that must outlive one connection, and the incoming QoS 2 state."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

from daemon.mqtt.errors import ConnectionLost, MqttError, SessionFull

# What a session holds by default: QoS 1/2 publishes not yet acknowledged (queued or in
# flight), in messages and in bytes (topic + payload + properties).
SESSION_MESSAGES: Final = 100_000
SESSION_BYTES: Final = 64 * 1024 * 1024


class InFlight:
    """A QoS 1/2 publish from the moment it is made until the broker has
    acknowledged it (or it is given up), across connections when its
    :class:`Session` is kept."""

    __slots__ = (
        "expires",
        "expiry",
        "future",
        "others_before",
        "packet_id",
        "payload",
        "props",
        "qos",
        "released",
        "retain",
        "seq",
        "size",
        "strikes",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        props: bytes,
        future: asyncio.Future[int] | None,
        strikes: int = 0,
        expiry: float | None = None,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props
        self.future = future
        self.strikes = strikes
        self.size = len(topic) + len(payload) + len(props)
        self.expiry = expiry  # the Message Expiry Interval asked for (s), aged on resend
        self.expires = time.monotonic() + expiry if expiry else 0.0
        self.packet_id = 0  # 0: not sent on the broker's session yet
        self.released = False  # QoS 2: PUBREC seen, PUBREL sent
        self.seq = 0  # when it was written (the connection's packet sequence)
        self.others_before = 0  # the last other packet the broker does not acknowledge


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A publish as its owner prepares it (:class:`daemon.bus.Bus`)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes  # the encoded MQTT 5 property block
    expiry: float | None = None  # Message Expiry Interval (s), also in ``props``

    @property
    def size(self) -> int:
        """What it takes of a session's byte bound (as :class:`InFlight` counts it)."""
        return len(self.topic) + len(self.payload) + len(self.props)


class Sender(Protocol):
    """What a session needs of the connection that serves it
    (:class:`daemon.mqtt.connection.Connection`)."""

    @property
    def usable(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: bytes,
        *,
        ack: bool,
        expiry: float | None,
    ) -> asyncio.Future[int] | None: ...


class Session:
    """The client's side of an MQTT session: what must outlive one connection.

    * outgoing QoS 1/2 publishes, from the moment they are made until the broker
      has acknowledged them: :attr:`queued` (not sent yet: no connection, or the
      in-flight window is full) and :attr:`inflight` (sent, by packet id, in the
      order sent);
    * the packet ids of incoming QoS 2 publishes not yet released (PUBREL), so a
      resent one is not delivered twice.

    A session made by its owner and handed to every :func:`connect` is *kept*:
    when a connection drops, its publishes wait (their futures stay pending) and
    the next connection sends them — with DUP and their packet ids when the broker
    kept its side (Session Present), otherwise as new publishes.  A session
    :func:`connect` makes for itself is not kept: a lost connection fails them.

    Bounded in messages and bytes (topic + payload + properties): past either,
    :meth:`admit` raises :class:`SessionFull` and :meth:`wait_room` waits.
    """

    def __init__(
        self,
        *,
        max_messages: int = SESSION_MESSAGES,
        max_bytes: int = SESSION_BYTES,
        keep: bool = True,
    ) -> None:
        self.inflight: dict[int, InFlight] = {}
        self.queued: deque[InFlight] = deque()
        self.incoming_qos2: set[int] = set()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.keep = keep
        self.connection: Sender | None = None
        self.bytes = 0
        self.dropped = 0  # QoS 0 offline or to a broker that stopped reading
        self.expired = 0  # their Message Expiry passed before they could be sent
        self.given_up = 0  # the broker closed the connection on them MAX_STRIKES times
        self._next_id = 0
        self._room: deque[asyncio.Future[None]] = deque()
        self._idle: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        return len(self.inflight) + len(self.queued)

    def has_room(self, size: int) -> bool:
        """Whether a publish of ``size`` bytes fits (one always fits an empty session)."""
        n = len(self.inflight) + len(self.queued)
        if n >= self.max_messages:
            return False
        return n == 0 or self.bytes + size <= self.max_bytes

    async def wait_room(self, size: int) -> None:
        """Until :meth:`has_room` (back-pressure for publishers that can wait)."""
        loop = asyncio.get_running_loop()
        while not self.has_room(size):
            waiter = loop.create_future()
            self._room.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room:
                    self._room.remove(waiter)

    async def wait_idle(self) -> None:
        """Until nothing is queued or in flight."""
        while self.inflight or self.queued:
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    def admit(self, out: InFlight) -> None:
        if not self.has_room(out.size):
            raise SessionFull(
                f"{len(self)} publishes ({self.bytes} bytes) wait for the broker: "
                f"publish to {out.topic[:200]!r} refused"
            )
        self.bytes += out.size

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        props: bytes = b"\x00",
        *,
        ack: bool = False,
        expiry: float | None = None,
    ) -> asyncio.Future[int] | None:
        """Publish through the live connection, or keep it for the next one (QoS 1/2;
        QoS 0 is at most once: dropped and counted while there is none)."""
        conn = self.connection
        if conn is not None and conn.usable:
            return conn.publish(topic, payload, qos, retain, props, ack=ack, expiry=expiry)
        if not qos:
            self.dropped += 1
            return None
        if not self.keep:
            raise ConnectionLost("not connected")
        future = asyncio.get_running_loop().create_future() if ack else None
        out = InFlight(
            topic, payload, qos=qos, retain=retain, props=props, future=future, expiry=expiry
        )
        self.admit(out)
        self.queued.append(out)
        return future

    def packet_id(self, taken: dict[int, Any]) -> int:
        inflight = self.inflight
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in inflight and self._next_id not in taken:
                return self._next_id
        raise MqttError("no free packet identifier")

    def finish(self, out: InFlight, reason: int | BaseException) -> None:
        """``out`` is done (acknowledged, refused or given up): free its room."""
        self.bytes -= out.size
        future = out.future
        if future is not None and not future.done():
            if isinstance(reason, BaseException):
                future.set_exception(reason)
                future.exception()  # retrieved: the publisher may have stopped waiting
            else:
                future.set_result(reason)
        if self._room:
            self._wake_room()
        if self._idle and not self.inflight and not self.queued:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _wake_room(self) -> None:
        while self._room:
            waiter = self._room[0]
            if waiter.done():
                self._room.popleft()
                continue
            waiter.set_result(None)  # it checks has_room itself, and waits again if not
            self._room.popleft()
            if not self.has_room(1):
                break

    def fail_all(self, error: MqttError) -> None:
        """Give every publish up (a session that is not kept lost its connection)."""
        left = [*self.inflight.values(), *self.queued]
        self.inflight.clear()
        self.queued.clear()
        for out in left:
            self.finish(out, error)
