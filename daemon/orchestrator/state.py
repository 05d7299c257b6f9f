"""The realm state store: small shared values such as ``armed`` or ``mode``.

:class:`StateView` is the read side any process may keep: it subscribes to the
retained ``state/+`` topics and holds every current value in memory (a camera
honouring ``armed``, a local workflow's conditions).  :class:`RealmStateStore`
is the orchestrator's writer: it validates ``state/<key>/set`` requests
(:class:`~daemon.protocol.state.StateSet`) — key syntax, the allowed values
configured in ``orchestrator.state_values``, unknown keys when
``state_strict`` — publishes the new retained
:class:`~daemon.protocol.state.RealmState` and tells its listeners.  A refused
request is logged and, when it carried a response topic, answered with a
:class:`~daemon.protocol.state.StateReply`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from daemon import topics
from daemon.bus import Bus, Inbound
from daemon.errors import MessageError
from daemon.messages import decode
from daemon.protocol.state import RealmState, StateReply, StateSet, valid_state_key
from daemon.protocol.task import ErrorInfo

log = logging.getLogger(__name__)

# (key, new value, previous value) after every change.
StateListener = Callable[[str, Any, Any], Awaitable[None]]
# (account of the request topic, key, value, alarm code) -> who sets it, for the record;
# raises StateError when that account may not.  The orchestrator's rules (roles, code).
StateAuthoriser = Callable[[str, str, Any, "str | None"], str]
# (reply topic, account) -> may that account be answered there?
ReplyCheck = Callable[["str | None", str], bool]


def _anyone(account: str, key: str, value: Any, code: str | None) -> str:
    return account


def _any_topic(topic: str | None, account: str) -> bool:
    return topics.valid_reply_topic(topic)


class StateError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StateView:
    """The current realm state as seen on the retained ``state/<key>`` topics."""

    def __init__(self, bus: Bus, realm: str) -> None:
        self.bus = bus
        self.realm = realm
        self.values: dict[str, RealmState] = {}
        self._listeners: list[StateListener] = []

    def on_change(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def get(self, key: str, default: Any = None) -> Any:
        st = self.values.get(key)
        return default if st is None else st.value

    def snapshot(self) -> dict[str, Any]:
        """Every key's current value (plain data, for templates and conditions)."""
        return {k: v.value for k, v in self.values.items()}

    async def start(self) -> None:
        await self.bus.subscribe(topics.STATE.filter(realm=self.realm), self._on_state)

    async def _on_state(self, msg: Inbound) -> None:
        fields = topics.STATE.parse(msg.topic)
        if fields is None:
            return
        key = fields["key"]
        if not msg.payload:  # a cleared retained topic: the key is gone
            old = self.values.pop(key, None)
            if old is not None:
                await self._changed(key, None, old.value)
            return
        try:
            state = decode(msg.payload, RealmState)
        except MessageError as exc:
            log.warning("bad realm state on %s: %s (%s)", msg.topic, exc, msg.preview())
            return
        if self._own_echo(key):
            return
        await self._apply(key, state)

    def _own_echo(self, key: str) -> bool:
        """True for the broker's copy of a value this process published itself."""
        return False

    async def _apply(self, key: str, state: RealmState) -> None:
        old = self.values.get(key)
        self.values[key] = state
        if old is None or old.value != state.value:
            await self._changed(key, state.value, None if old is None else old.value)

    async def _changed(self, key: str, value: Any, old: Any) -> None:
        for listener in list(self._listeners):
            try:
                await listener(key, value, old)
            except Exception:
                log.exception("state listener failed for %s", key)


class RealmStateStore(StateView):
    """The orchestrator's state store: validates set requests, publishes retained values."""

    def __init__(
        self,
        bus: Bus,
        realm: str,
        allowed: Mapping[str, list[Any]] | None = None,
        *,
        strict: bool = False,
        authorise: StateAuthoriser = _anyone,
        reply_ok: ReplyCheck = _any_topic,
    ) -> None:
        super().__init__(bus, realm)
        self.allowed = dict(allowed or {})
        self.strict = strict
        self.authorise = authorise
        self.reply_ok = reply_ok
        # Own publishes not yet seen back: their echoes are skipped so that two quick
        # sets never flip the in-memory value back to the older one.
        self._pending: dict[str, int] = {}

    def _own_echo(self, key: str) -> bool:
        n = self._pending.get(key, 0)
        if n <= 0:
            return False
        if n == 1:
            del self._pending[key]
        else:
            self._pending[key] = n - 1
        return True

    async def start(self) -> None:
        await super().start()
        await self.bus.subscribe(topics.STATE_SET.filter(realm=self.realm), self._on_set)

    def check(self, key: str, value: Any) -> None:
        """Raise :class:`StateError` if ``key`` may not take ``value``."""
        if not valid_state_key(key):
            raise StateError(
                "bad_request", f"invalid state key {key!r}: lower case, digits and _, 1-64 chars"
            )
        allowed = self.allowed.get(key)
        if allowed is None:
            if self.strict:
                raise StateError("bad_request", f"unknown state key {key!r}")
            if isinstance(value, dict | list):
                raise StateError("bad_request", "state values are scalars (string, number, bool)")
            return
        # bool is an int in Python: compare type as well so True never passes for 1.
        if not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(str(a) for a in allowed)
            raise StateError("bad_value", f"{key} must be one of: {shown} (got {value!r})")

    async def set(self, key: str, value: Any, by: str = "") -> RealmState:
        """Validate and publish a new value (retained); raises :class:`StateError`."""
        self.check(key, value)
        state = RealmState(value=value, by=by)
        await self._apply(key, state)
        self._pending[key] = self._pending.get(key, 0) + 1
        await self.bus.publish(
            topics.STATE.build(realm=self.realm, key=key), state, retain=True, wait=False
        )
        log.info("state %s = %r (by %s)", key, value, by or "?")
        return state

    async def _on_set(self, msg: Inbound) -> None:
        fields = topics.STATE_SET.parse(msg.topic)
        if fields is None or msg.retain:  # a retained request would replay at every start
            return
        key, account = fields["key"], fields["user"]
        value: Any = None
        try:
            req = decode(msg.payload, StateSet)
            value = req.value
            self.check(key, value)
            by = self.authorise(account, key, value, req.code)
            await self.set(key, value, by)
        except (MessageError, StateError) as exc:
            log.warning(
                "refused state set of %r by %s: %s (payload %s)", key, account, exc, msg.preview()
            )
            err = ErrorInfo(code=exc.code, message=str(exc))
            self._reply(account, msg, StateReply(ok=False, key=key, value=value, error=err))
            return
        self._reply(account, msg, StateReply(ok=True, key=key, value=value))

    def _reply(self, account: str, msg: Inbound, reply: StateReply) -> None:
        if msg.response_topic and self.reply_ok(msg.response_topic, account):
            self.bus.post(msg.response_topic, reply, correlation_data=msg.correlation_data)
