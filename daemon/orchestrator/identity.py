"""Who sent a request, and with which role: identity from the broker.

Every request topic ends in the sender's account (``task/submit/<account>``,
``orchestrator/admin/<account>``, ``state/<key>/set/<account>`` ...).  Where
the realm's broker is configured by ``mtor broker`` (``orchestrator.
accounts_file`` set), its ACL lets each MQTT username write only under its own
name, so that level *is* the authenticated identity and its role comes from
``accounts.json``; names and tokens inside payloads are ignored.  On a broker
the realm did not configure, the level is only a claim: roles then come from
API tokens (``users.json``), and a claimed name never gets sysop rights.

The orchestrator's own account may act on behalf of a named user (workflow
runs submit as ``workflows``); no other account can.  The HTTP gateway's
account (role ``gateway``) acts only for the person whose API token it relays:
the token is checked here against ``users.json``, so the gateway can never be
more than the people who log in through it, and a name it writes counts for
nothing.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Final

from daemon.accounts import Accounts, valid_account
from daemon.orchestrator.config import OrchestratorConfig, RequestLimits
from daemon.orchestrator.tasks import TokenBucket
from daemon.orchestrator.users import Users

# Roles the users database may hold (older databases say "device" for a node).
ROLE_ALIASES: Final = {"device": "node"}
# Request buckets kept at most (one per identity); the oldest go first.
MAX_BUCKETS: Final = 10_000


class Refused(Exception):
    """A request the realm will not serve; ``code`` goes back to the requester."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # who the task or request is for (the account, or whom the orchestrator acts for)
    role: str


class Identities:
    def __init__(self, cfg: OrchestratorConfig, users: Users, accounts: Accounts | None) -> None:
        self.cfg = cfg
        self.users = users
        self.accounts = accounts

    def account_role(self, account: str) -> str | None:
        """The role of a broker account (None: unknown, or no accounts file)."""
        if self.accounts is None:
            return None
        self.accounts.maybe_reload()
        return self.accounts.role(account)

    def identify(
        self, account: str, token: str | None = None, on_behalf: str | None = None
    ) -> Identity:
        """The identity of a request that arrived on a topic naming ``account``.

        Raises :class:`Refused` for an unknown account, a wrong or missing token,
        or a banned user."""
        if not valid_account(account):  # a topic level, but not a name an ACL could hold
            raise Refused("bad_request", "the account level of the topic is not a valid name")
        if on_behalf is not None and not valid_account(on_behalf):
            on_behalf = None
        if self.accounts is not None:
            role = self.account_role(account)
            if role is None:
                raise Refused("unauthorized", f"unknown account {account!r}")
            ident = Identity(account, role)
            if role == "orchestrator" and on_behalf and on_behalf != account:
                ident = Identity(on_behalf, self._named_role(on_behalf))
            elif role == "gateway":
                ident = self._by_token(token, "the gateway acts only for a user's API token")
        elif token:
            ident = self._by_token(token, "")
        elif self.cfg.require_token:
            raise Refused("unauthorized", "this realm requires an API token")
        else:
            name = on_behalf if (on_behalf and account == "orchestrator") else account
            ident = Identity(name, self._named_role(name))
        self._check_ban(ident.name)
        return ident

    def _by_token(self, token: str | None, missing: str) -> Identity:
        """The user an API token belongs to (``users.json``)."""
        if not token:
            raise Refused("unauthorized", missing)
        user = self.users.by_token(token)
        if user is None:
            raise Refused("unauthorized", "invalid API token")
        return Identity(user["name"], ROLE_ALIASES.get(user["role"], user["role"]))

    def _named_role(self, name: str) -> str:
        """The role of a name nobody authenticated: never sysop (that needs proof)."""
        known = self.users.get(name)
        role = known["role"] if known else self.cfg.anonymous_role
        role = ROLE_ALIASES.get(role, role)
        return self.cfg.anonymous_role if role in ("sysop", "orchestrator") else role

    def _check_ban(self, name: str) -> None:
        known = self.users.get(name)
        if known is not None and known.get("banned"):
            reason = f": {known['reason']}" if known.get("reason") else ""
            raise Refused("banned", f"user {name!r} is banned{reason}")

    def may_offer(self, node_id: str, capability: str) -> bool:
        """May the account ``node_id`` offer ``capability``?  Person accounts never;
        node accounts as ``orchestrator.offers`` says (any, when not listed)."""
        if self.accounts is not None:
            role = self.account_role(node_id)
            if role != "node":
                return False
        patterns = self.cfg.offers.get(node_id)
        if patterns is None:
            return True
        from fnmatch import fnmatchcase

        return any(fnmatchcase(capability, p) for p in patterns)


def check_code(expected: str | None, given: object) -> bool:
    """Constant-time comparison of an alarm code (True when none is configured)."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class RequestLimiter:
    """A token bucket per identity for the request topics (admin, workflows, state)."""

    def __init__(self, limits: RequestLimits) -> None:
        self.limits = limits
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, who: str, now: float | None = None) -> bool:
        bucket = self._buckets.get(who)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[who] = TokenBucket(self.limits.rate_per_s, self.limits.burst)
        return bucket.take(time.monotonic() if now is None else now)
