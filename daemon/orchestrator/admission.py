"""Admission: who a request is from, and whether it is served at all.

Pure policy over the broker's identity (see :mod:`daemon.orchestrator.identity`):
the account a request topic names, the role it has, per-account request rates,
per-user task rates, reply topics inside the sender's own reply space, and who
may set which realm state.  No queues, no peers, no I/O: the scheduling core
(:mod:`daemon.orchestrator.core`) decides what an admitted task does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

from daemon import topics
from daemon.accounts import ORCHESTRATOR_ACCOUNT, Accounts
from daemon.errors import ConfigError, MessageError
from daemon.messages import decode
from daemon.orchestrator.config import OrchestratorConfig
from daemon.orchestrator.identity import (
    Identities,
    Identity,
    Refused,
    RequestLimiter,
    check_code,
)
from daemon.orchestrator.state import StateError
from daemon.orchestrator.tasks import TokenBucket, bucket_for
from daemon.orchestrator.users import Users
from daemon.protocol.task import ErrorInfo, TaskSubmit, TaskUpdate

if TYPE_CHECKING:
    from daemon.bus import Inbound

log = logging.getLogger(__name__)

# Task-rate buckets kept at most (one per user); the oldest go first.
MAX_TASK_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Submission:
    """A decoded submission on ``task/submit/<account>``, its reply topic checked."""

    account: str
    submit: TaskSubmit
    reply_topic: str | None


class Admission:
    def __init__(
        self, cfg: OrchestratorConfig, realm: str, users: Users, accounts: Accounts | None
    ) -> None:
        self.cfg = cfg
        self.identities = Identities(cfg, users, accounts)
        self.requests = RequestLimiter(cfg.requests)
        self.reply_root = topics.REPLY.filter(realm=realm).removesuffix("+/#")
        self.buckets: dict[str, TokenBucket] = {}
        self.alarm_code = _read_alarm_code(cfg)

    def identify(
        self, account: str, token: str | None = None, on_behalf: str | None = None
    ) -> Identity:
        """Who a request from ``account`` (its topic's identity level) is for, and
        with which role; :class:`Refused` when unknown, unauthorised or banned."""
        return self.identities.identify(account, token, on_behalf)

    def request_account(
        self, msg: Inbound, pattern: topics.TopicPattern, what: str, *, limited: bool = True
    ) -> str | None:
        """The account a request topic names, or None when the request is not served:
        not of ``pattern``, retained (it would be served again at every start), or, when
        ``limited``, over the account's rate (``orchestrator.requests``; the
        orchestrator's own is not)."""
        fields = pattern.parse(msg.topic)
        if fields is None:
            return None
        account = fields["user"]
        if msg.retain:
            log.warning("retained %s request from %s ignored", what, account[:64])
            return None
        if limited and account != ORCHESTRATOR_ACCOUNT and not self.requests.allow(account):
            log.warning("%s requests from %s over the rate limit: dropped", what, account[:64])
            return None
        return account

    def submission(self, msg: Inbound) -> Submission | tuple[str, TaskUpdate] | None:
        """The submission ``msg`` carries; ``(topic, update)``: refused, with the answer
        to send; None: not served and not answered (logged).  A reply topic outside
        the sender's own reply space is never written to."""
        # Submissions are limited per user and role by admit, not as requests.
        account = self.request_account(msg, topics.TASK_SUBMIT, "task", limited=False)
        if account is None:
            return None
        reply_topic = msg.response_topic
        try:
            submit = decode(msg.payload, TaskSubmit)
        except MessageError as exc:
            log.warning("rejected submission from %s: %s (payload %s)", account, exc, msg.preview())
            if not self.reply_ok(reply_topic, account):
                return None
            error = ErrorInfo(code=exc.code, message=str(exc))
            return reply_topic, TaskUpdate(task_id="invalid", status="failed", error=error)
        reply_topic = reply_topic or submit.reply_to
        if reply_topic is not None and not self.reply_ok(reply_topic, account):
            root = self.reply_root
            log.warning(
                "submission from %s with reply topic %r outside %s%s/ dropped",
                account, reply_topic[:200], root, account,
            )  # fmt: skip
            return None
        return Submission(account, submit, reply_topic)

    def reply_ok(self, topic: str | None, account: str) -> TypeGuard[str]:
        """May ``account`` be answered on ``topic``?  Only inside its own reply space
        (``reply/<account>/...``): the orchestrator writes nowhere else for anyone."""
        return (
            topics.valid_reply_topic(topic)
            and topic.startswith(self.reply_root)
            and topic[len(self.reply_root) :].startswith(account + "/")
        )

    def authorise_state(self, account: str, key: str, value: Any, code: str | None) -> str:
        """May ``account`` set realm state ``key`` to ``value``?  Returns who it is (for
        the record); raises StateError.  Roles per key (``orchestrator.state_roles``), a
        rate limit per identity, and the alarm code for disarming."""
        if not self.requests.allow(account):
            raise StateError("rate_limited", f"{account} sends state requests too fast")
        try:
            ident = self.identify(account)
        except Refused as exc:
            raise StateError(exc.code, str(exc)) from exc
        roles = self.cfg.state_roles
        allowed = roles.get(key, roles.get("*", []))
        if ident.role not in allowed:
            raise StateError("forbidden", f"a {ident.role} may not set {key!r}")
        if key == "armed" and value == "disarmed" and not check_code(self.alarm_code, code):
            raise StateError("bad_code", "disarming needs the alarm code")
        return ident.name

    def admit(self, submit: TaskSubmit, user: str, role: str, now: float, mono: float) -> None:
        """The user's task rate (``orchestrator.roles``) and a deadline not yet past;
        raises :class:`Refused`.  ``now``: epoch seconds, ``mono``: monotonic."""
        limits = self.cfg.roles.get(role)
        if limits is not None:
            bucket = self.buckets.get(user)
            if bucket is None:
                if len(self.buckets) >= MAX_TASK_BUCKETS:
                    self.buckets.pop(next(iter(self.buckets)))
                bucket = self.buckets[user] = bucket_for(limits)
            if not bucket.take(mono):
                raise Refused("rate_limited", f"user {user!r} exceeds {limits.rate_per_s:g}/s")
        if submit.deadline is not None and submit.deadline <= now:
            raise Refused("timeout", "the deadline has already passed")

    def may_offer(self, node_id: str, capability: str) -> bool:
        return self.identities.may_offer(node_id, capability)


def _read_alarm_code(cfg: OrchestratorConfig) -> str | None:
    if cfg.alarm_code is not None:
        return cfg.alarm_code.get_secret_value()
    if cfg.alarm_code_file is not None:
        try:
            code = cfg.alarm_code_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"orchestrator.alarm_code_file: cannot read {cfg.alarm_code_file}: {exc.strerror}"
            ) from exc
        if not code:  # the panel would ask for a code nobody checks
            raise ConfigError(f"orchestrator.alarm_code_file: {cfg.alarm_code_file} is empty")
        return code
    return None
