"""The bottom layer of :class:`daemon.mqtt.connection.Connection`: the transport,
writing (every packet of one loop iteration in one ``transport.write``), keep-alive
and closing.  The layers above it (:mod:`.publishing`, :mod:`.handshake`,
:mod:`.reading`) share its state; none is used alone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Final

from daemon.mqtt import codec
from daemon.mqtt.codec import reason_text
from daemon.mqtt.errors import ConnectionLost, MqttError
from daemon.mqtt.params import ConnectParams
from daemon.mqtt.session import Session

# The connection's one logger, whichever of its modules speaks: log filters and
# the tests name it.
log = logging.getLogger("daemon.mqtt.connection")

# Bytes the transport may hold unsent (a broker that stopped reading) before QoS 0
# publishes are dropped; QoS 1/2 are bounded by the in-flight window and the session.
WRITE_BUFFER_LIMIT: Final = 8 * 1024 * 1024


class Wire(asyncio.Protocol):
    """The transport and the write side of a connection."""

    def __init__(self, params: ConnectParams, session: Session | None = None) -> None:
        self.params = params
        self.session = session if session is not None else Session(keep=False)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._transport: asyncio.BaseTransport | None = None
        self._write_transport: asyncio.WriteTransport | None = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._acks_only = False  # _out holds nothing but acknowledgements
        self._acks_waited = False  # ... and the flush already waited one iteration for more
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: MqttError | None = None
        self._paused = False  # reading paused (see Reading): the broker's silence is ours
        self._write_paused = False  # the transport's buffer is past WRITE_BUFFER_LIMIT
        self._keepalive = params.keepalive
        self._last_sent = self._last_heard = time.monotonic()
        self._ping_timer: asyncio.TimerHandle | None = None
        self.broker_reason: int | None = None  # a DISCONNECT's reason; -1: closed silently

    # ----------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        assert isinstance(transport, asyncio.WriteTransport)
        self._write_transport = transport
        with contextlib.suppress(NotImplementedError):  # the websocket framing has none
            transport.set_write_buffer_limits(high=WRITE_BUFFER_LIMIT)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    def _protocol_error(self, why: str, reason: int) -> None:
        """The broker broke the protocol: say why in a DISCONNECT (4.13), then close."""
        if self._error is None and self._write_transport is not None:
            log.warning("closing the broker connection: %s (%s)", why, reason_text(reason))
            self._out.clear()
            self._write(codec.encode_disconnect(reason, why))
            self._write_out()
        self._fail(why)

    # ------------------------------------------------------------- writing

    def _write(self, data: bytes) -> None:
        self._acks_only = False
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _ack(self, data: bytes) -> None:
        """Queue an acknowledgement; it leaves with the next write, or on its own
        one loop iteration later (see :meth:`_flush`)."""
        if not self._out:
            self._acks_only = True
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._acks_only and not self._acks_waited:
            # Only acknowledgements so far: let the handlers of what they acknowledge run
            # first, so their answers leave in the same write, and the ack's syscall does
            # not delay the dispatch (one send instead of two on a worker's hot path).
            self._acks_waited = True
            self._loop.call_soon(self._flush)
            return
        self._flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        self._acks_only = self._acks_waited = False
        out = self._out
        if not out:
            return
        transport = self._write_transport
        if transport is None or transport.is_closing():
            out.clear()
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        self._last_sent = time.monotonic()

    # ------------------------------------------------------------ keepalive

    def _tick(self) -> None:
        now = time.monotonic()
        interval = self._keepalive
        if (
            now - self._last_heard > interval * 1.5 and not self._paused
        ):  # paused: we stopped reading
            self._fail(f"the broker was silent for {now - self._last_heard:.1f}s (keepalive)")
            return
        if now - self._last_sent >= interval / 2:
            self._write(codec.PINGREQ_PACKET)
        self._ping_timer = self._loop.call_later(interval / 2, self._tick)

    # -------------------------------------------------------------- closing

    @property
    def closed(self) -> bool:
        """No longer usable (failed, lost or closed; the socket may still be closing)."""
        return self._error is not None or self._closed.done()

    @property
    def error(self) -> MqttError:
        """Why the connection ended (only once it has)."""
        return self._error or ConnectionLost("connection to the broker lost")

    @property
    def usable(self) -> bool:
        return self._error is None and self._transport is not None

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _fail(self, why: str) -> None:
        if self._error is None:
            log.debug("closing the broker connection: %s", why)
            self._error = ConnectionLost(why)
        self._close_transport(abort=True)

    def _close_transport(self, *, abort: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        if abort and isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()
