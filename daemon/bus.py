"""The MQTT 5 bus: the one broker connection of a process.

:class:`Bus` owns a :class:`daemon.mqtt.Connection` inside a supervised reconnect loop
(capped exponential backoff with jitter, reset only once a connection has held).  On
every connect it subscribes every registered filter again (including those registered
meanwhile), sends what was published while it was away, and runs the ``on_connect``
hooks (birth, adverts) — in that order, so a birth is only seen once the node can hear
replies.

* Publishes live in one :class:`daemon.mqtt.Session` for the bus's lifetime, bounded
  in messages and bytes (``broker.outbox_size`` / ``outbox_bytes``): what the broker
  had not acknowledged when a connection dropped, and what was published while there
  was none, is sent on the next connection.  With ``session_expiry`` the broker keeps
  our side too (subscriptions, messages queued for us while we are away) and the
  next connection resumes it (resending with DUP; see :meth:`Bus._start_session`
  for a process's first); otherwise each connect starts clean.
  :meth:`Bus.publish` waits while the outbox is full; :meth:`Bus.post` drops (counted).
* Each filter gets an MQTT 5 subscription identifier; an incoming message is
  dispatched to the handlers of exactly the subscriptions it matched, once — also
  from brokers that name only some of them (see :meth:`Bus._route`).
* Handlers are isolated: one that raises is logged and dispatch goes on.  Dispatch
  runs beside the reconnect loop, so a handler that waits for an acknowledgement
  across a reconnect does not hold the reconnect up.
* Refused credentials or authorisation is fatal (:class:`BusAuthError`); a refused
  subscription raises :class:`BusSubscribeError` and is forgotten, never resent.
* Topics made from data are checked before anything is sent: a topic that is
  not a valid MQTT topic name (empty, a wildcard, U+0000, not UTF-8, too long)
  or a payload that cannot be encoded is refused — :meth:`Bus.publish` raises
  :class:`BusPublishError`, :meth:`Bus.post` drops it with a log line — so it
  never gets the connection closed.  A publish the broker refuses (a reason
  code, or closing the connection on it) is never replayed forever either:
  see :class:`daemon.mqtt.PublishRejected` and ``MAX_STRIKES``.
* Built from parts, one module each: :mod:`daemon.bus_routing` (subscriptions,
  dispatch) and :mod:`daemon.bus_publish` (publishing); the types users see are in
  :mod:`daemon.bus_types`.  This module holds the connection's lifecycle.
* Another process with our client id (a cloned image, two daemons with one node
  id) is said plainly, and backed off from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass, replace
from typing import Final

from daemon.bus_publish import LOGGED_REFUSALS, Publishing
from daemon.bus_routing import SUBSCRIBE_REFUSALS, Routing, Subscription
from daemon.bus_types import LOG_PAYLOAD_BYTES, Handler, Hook, Inbound, Payload, to_bytes, truncate
from daemon.config import BrokerConfig
from daemon.errors import BusAuthError, BusError, BusNotConnectedError
from daemon.mqtt import (
    Connection,
    ConnectParams,
    ConnectRefused,
    MqttError,
    Session,
    Will,
    connect,
)
from daemon.mqtt.connection import SESSION_MESSAGES

__all__ = [
    "AUTH_FAILURES",
    "LOGGED_REFUSALS",
    "LOG_PAYLOAD_BYTES",
    "MAX_QUEUED_INCOMING",
    "RECEIVE_MAXIMUM",
    "STABLE_AFTER",
    "SUBSCRIBE_REFUSALS",
    "TAKEOVER_SUSPECT",
    "TAKEOVER_WINDOW",
    "Bus",
    "Handler",
    "Hook",
    "Inbound",
    "Payload",
    "Subscription",
    "to_bytes",
    "truncate",
]

# The bus's one logger, whichever of its modules speaks: log filters and the
# tests name it.
log = logging.getLogger("daemon.bus")

# CONNACK reason codes that no retry can fix: bad user name or password, not
# authorized, bad authentication method (MQTT 5, 3.2.2.2).
AUTH_FAILURES: Final = frozenset({0x86, 0x87, 0x8C})

# A dispatch queue this deep means handlers cannot keep up: the connection stops
# reading (TCP back-pressure to the broker) until dispatch catches up.
MAX_QUEUED_INCOMING: Final = 50_000

# QoS 1/2 messages the broker may have in flight to us (MQTT 5 Receive Maximum).  Left
# unsaid, Mosquitto allows 20 and queues 1,000 more (max_queued_messages), then drops
# *silently*: a process whose loop is busy for a moment lost messages in a burst.  The
# connection acknowledges on read, so the real bound is MAX_QUEUED_INCOMING on our side.
RECEIVE_MAXIMUM: Final = 65_535

# A connection that stayed up this long (s) resets the reconnect backoff.
STABLE_AFTER: Final = 10.0

# The broker closing our connection this soon (s) after CONNACK without a word, this
# many times in a row, is taken for another process connecting with our client id.
TAKEOVER_WINDOW: Final = 3.0
TAKEOVER_SUSPECT: Final = 3


@dataclass(frozen=True, slots=True)
class _WillOptions:
    qos: int = 1
    retain: bool = True

    def __str__(self) -> str:
        return f"at QoS {self.qos}{', retained' if self.retain else ', not retained'}"


class Bus(Routing, Publishing):
    """One MQTT 5 connection with reconnect, resubscribe, hooks and flow control."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        password: str | None = None,
        will: tuple[str, Payload] | None = None,
        session_expiry: int = 0,
        duplicate_hint: str | None = None,
    ) -> None:
        """``session_expiry`` > 0: a persistent session (the broker keeps our
        subscriptions and queues QoS 1/2 messages for us that long while we are
        away); 0: a clean session on every connect.  ``duplicate_hint``: what to
        ask when another process keeps taking our client id over."""
        super().__init__()
        self.config = config
        self.client_id = client_id
        self._password = password
        self._will = will
        self._session_expiry = session_expiry
        self._fresh = True  # no session of ours on the broker yet (see _start_session)
        self._reconnect_now = False  # reconnect() asked: no backoff this time
        self._will_as = _WillOptions()  # lowered if the broker refuses QoS 1 / retain
        self._duplicate_hint = duplicate_hint
        self._session = Session(
            max_messages=config.outbox_size or SESSION_MESSAGES, max_bytes=config.outbox_bytes
        )
        self._conn = None
        self._loop = None
        self._thread = None
        self._connected = asyncio.Event()
        self._hooks: list[Hook] = []
        self._takeovers = 0  # connections the broker ended soon after CONNACK, in a row
        self.connects = 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stats(self) -> dict[str, int]:
        """Counters for health reports."""
        conn = self._conn
        return {
            "connects": self.connects,
            "dropped": self.dropped,
            "refused": self.refused,
            "handler_errors": self.handler_errors,
            "outbox": len(self._session),
            "outbox_bytes": self._session.bytes,
            "inbox_dropped": conn.dropped_incoming if conn is not None else 0,
        }

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise BusNotConnectedError(
                f"no connection to the broker at {self.config.url} after {timeout:g}s"
            ) from exc

    def set_will(self, topic: str, payload: Payload) -> None:
        """The will from the next connection on (see :meth:`reconnect`)."""
        self._will = (topic, payload)

    def reconnect(self) -> None:
        """Close the connection normally (its will is not sent) and connect again at
        once: e.g. for a new will to take effect.  The session goes on."""
        conn = self._conn
        if conn is not None:
            self._reconnect_now = True
            asyncio.get_running_loop().create_task(conn.close())

    def on_connect(self, hook: Hook) -> None:
        """Run ``hook`` after every (re)connect, once subscriptions are in place."""
        self._hooks.append(hook)

    # -------------------------------------------------------------- lifecycle

    def _params(self) -> ConnectParams:
        ep = self.config.endpoint
        will = None
        if self._will is not None:
            topic, payload = self._will
            will = Will(
                topic, to_bytes(payload), qos=self._will_as.qos, retain=self._will_as.retain
            )
        return ConnectParams(
            host=ep.host,
            port=ep.port,
            client_id=self.client_id,
            transport=ep.transport,
            websocket_path=ep.path or "/",
            tls=self._tls_context() if ep.tls else None,
            username=self.config.username,
            password=self._password,
            keepalive=self.config.keepalive,
            # With a session expiry, always resume (see _start_session).
            clean_start=not self._session_expiry,
            session_expiry=self._session_expiry,
            will=will,
            receive_maximum=RECEIVE_MAXIMUM,
            max_inflight=self.config.max_inflight,
            connect_timeout=self.config.connect_timeout,
            max_queued_incoming=MAX_QUEUED_INCOMING,
            max_packet_size=self.config.max_packet_size,
        )

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.config.tls
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise BusError(f"TLS setup failed: {exc}") from exc
        if tls.insecure:
            ctx.check_hostname = False
        return ctx

    async def run(self) -> None:
        """Stay connected until cancelled.  Raises :class:`BusAuthError` on refusal.

        The backoff between attempts grows until a connection has stayed up for
        ``STABLE_AFTER``: a broker that accepts and then drops us at once (a
        publish it refuses, another process with our client id) is not hammered."""
        attempt = 0
        rc = self.config.reconnect
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        dispatcher = asyncio.create_task(self._dispatcher(), name="bus-dispatch")
        try:
            while True:
                conn: Connection | None = None
                try:
                    if self._session_expiry and self._fresh:
                        await self._start_session()
                    conn = await connect(self._params(), self._session)
                    await self._connection(conn)
                except ConnectRefused as exc:
                    if exc.code in (0x9A, 0x9B) and self._will_downgraded(exc):
                        continue  # at once, with a will the broker can take
                    if exc.code in AUTH_FAILURES:
                        raise BusAuthError(
                            f"broker {self.config.url} refused the connection: {exc}. "
                            "Check broker.username / password and the broker's ACL."
                        ) from exc
                    self._lost(exc, attempt)
                except MqttError as exc:
                    if not self._reconnect_now:
                        self._lost(exc, attempt)
                finally:
                    self._connected.clear()
                    self._conn = None
                    if conn is not None:
                        await conn.close()
                if self._reconnect_now:
                    self._reconnect_now = False
                    continue
                if conn is not None and conn.connected_at:
                    lived = time.monotonic() - conn.connected_at
                    if lived >= STABLE_AFTER:
                        attempt = 0
                    self._check_takeover(conn, lived)
                delay = rc.initial_delay * (2 ** min(attempt, 30))
                delay *= 1 + random.uniform(-rc.jitter, rc.jitter)
                delay = min(rc.max_delay, delay)  # capped after the jitter: never past max_delay
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher

    async def _start_session(self) -> None:
        """A process's first connect with a session expiry: drop whatever session an
        earlier process left with our client id (we have no state for it: stale
        subscriptions, messages queued for a configuration that is gone;
        MQTT-3.2.2-4), then resume the fresh one from the next CONNECT on — with
        Clean Start 0 from the start, because Mosquitto 2.0.11 writes to disk only
        sessions made that way (one made with Clean Start 1 is lost when the broker
        restarts)."""
        clean = await connect(replace(self._params(), clean_start=True), Session(keep=False))
        await clean.close()  # a normal DISCONNECT: the will is not sent
        self._fresh = False

    def _will_downgraded(self, exc: ConnectRefused) -> bool:
        """The broker refused our will (0x9A: it has no retained messages; 0x9B: not
        its QoS): send it without retain / at QoS 0 from now on, once."""
        will = self._will_as
        if exc.code == 0x9A and will.retain:
            self._will_as = replace(will, retain=False)
        elif exc.code == 0x9B and will.qos:
            self._will_as = replace(will, qos=0)
        else:
            return False
        log.warning("%s: the will is sent %s from now on", exc, self._will_as)
        return True

    def _check_takeover(self, conn: Connection, lived: float) -> None:
        """Another process connected with our client id takes the session over, and we
        take it back, forever (cloned images, two daemons with one node id): say so."""
        reason = conn.broker_reason
        silent = reason == -1 and lived < TAKEOVER_WINDOW and not conn.closed_on_publish
        if reason == 0x8E or silent:
            self._takeovers += 1
        else:
            self._takeovers = 0
            return
        n = self._takeovers
        if (reason == 0x8E and n == 1) or n == TAKEOVER_SUSPECT or n % 100 == 0:
            hint = f" — {self._duplicate_hint}" if self._duplicate_hint else ""
            how = (
                "(session taken over)"
                if reason == 0x8E
                else f"{n} times in a row, each within {TAKEOVER_WINDOW:g}s of connecting"
            )
            log.error(
                "another process is connected to the broker as %s: the broker dropped us %s%s. "
                "Backing off; two clients with one client id knock each other off forever.",
                self.client_id,
                how,
                hint,
            )

    async def _connection(self, conn: Connection) -> None:
        """One connection: resubscribe, send the outbox, run the hooks; returns by
        raising :class:`MqttError` when the connection ends."""
        self._conn = conn
        self._use_ids = conn.sub_ids_ok
        await self._resubscribe(conn)
        self._connected.set()
        self.connects += 1
        log.info(
            "connected to %s as %s%s",
            self.config.url,
            self.client_id,
            " (session resumed)" if conn.session_present and self.connects > 1 else "",
        )
        conn.start_sending()  # the outbox, now that replies can be heard
        ready = asyncio.Event()
        self._ready.put_nowait((conn, ready))
        hooks = asyncio.create_task(self._run_hooks(ready))
        try:
            await conn.wait_closed()
        finally:
            if not hooks.done():
                hooks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hooks
        raise conn.error

    async def _run_hooks(self, ready: asyncio.Event) -> None:
        try:
            for hook in self._hooks:
                try:
                    await hook()
                except MqttError as exc:
                    log.debug("on-connect hook %s: %s", getattr(hook, "__qualname__", hook), exc)
                except Exception:
                    log.exception("on-connect hook %s failed", getattr(hook, "__qualname__", hook))
        finally:
            ready.set()

    def _lost(self, exc: Exception, attempt: int) -> None:
        if isinstance(exc, ConnectRefused) and exc.legacy:
            if attempt in (0, 3) or attempt % 20 == 0:
                log.error("cannot use the broker at %s: %s", self.config.url, exc)
        elif self.connects and attempt == 0:
            log.warning("lost the broker at %s: %s; reconnecting", self.config.url, exc)
        elif attempt in (0, 3) or attempt % 20 == 0:
            log.warning("cannot reach the broker at %s: %s (retrying)", self.config.url, exc)

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for unacknowledged publishes before the run task is cancelled.

        Cancelling :meth:`run` disconnects gracefully, so the will is not sent.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()
