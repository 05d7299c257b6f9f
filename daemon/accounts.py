"""The realm's accounts: MQTT usernames and the role each one has.

Identity in the realm is the MQTT username the broker authenticated: the
generated broker configuration (``mtor broker``, :mod:`daemon.provision`)
gives every account an ACL made from its role, so a message's topic tells who
sent it (a node publishes only under ``node/<its username>/...``, a user
submits only on ``task/submit/<its username>``).  This module is the one
record of which account has which role: ``accounts.json`` in the broker
directory, written by ``mtor broker`` and read by the orchestrator
(``orchestrator.accounts_file``), which reloads it when it changes.

Passwords are not kept here (Mosquitto's password file holds their hashes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

log = logging.getLogger(__name__)

Role = Literal["orchestrator", "sysop", "user", "guest", "node", "homeassistant", "gateway"]
ROLES: Final[tuple[Role, ...]] = (
    "orchestrator",
    "sysop",
    "user",
    "guest",
    "node",
    "homeassistant",
    "gateway",
)
# The orchestrator's account: nodes take realm state and workflow runs only from it.
ORCHESTRATOR_ACCOUNT: Final = "orchestrator"
# The HTTP gateway's account (role ``gateway``): it relays requests of people who
# proved themselves to it with an API token, which the orchestrator checks again.
GATEWAY_ACCOUNT: Final = "gateway"
# What a process calls itself on a broker without usernames (an unconfigured realm).
ANONYMOUS: Final = "anonymous"
# An account name is one MQTT topic level a broker ACL can name safely.
ACCOUNT_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
# How often (s) a reader looks at the file's modification time.
RELOAD_CHECK_INTERVAL: Final = 2.0


def valid_account(name: str) -> bool:
    return ACCOUNT_RE.match(name) is not None


def account_name(username: str | None, fallback: str = ANONYMOUS) -> str:
    """The identity level a process writes into request topics: its MQTT username, or
    (on a broker without usernames) ``fallback`` — then only a claim."""
    name = username or fallback
    return name if valid_account(name) else ANONYMOUS


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: Role
    created: float = 0.0


class Accounts:
    """``accounts.json``: ``{"version": 1, "realm": R, "accounts": {name: {role, created}}}``."""

    def __init__(self, path: Path, realm: str = "home") -> None:
        self.path = path
        self.realm = realm
        self._accounts: dict[str, Account] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self.reload()

    # ------------------------------------------------------------------ read

    def reload(self) -> None:
        """Read the file again (a missing file is no accounts; a broken one keeps the old)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._accounts, self._mtime = {}, None
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            accounts = _parse(raw)
        except (OSError, ValueError) as exc:
            log.error(  # noqa: TRY400 - one line, not a traceback: the file is the fault
                "cannot read accounts file %s: %s (keeping the previous accounts)", self.path, exc
            )
            return
        self.realm = str(raw.get("realm", self.realm))
        self._accounts, self._mtime = accounts, st.st_mtime

    def maybe_reload(self, now: float | None = None) -> None:
        """Reload when the file changed; looks at most every RELOAD_CHECK_INTERVAL s."""
        now = time.monotonic() if now is None else now
        if now - self._checked < RELOAD_CHECK_INTERVAL:
            return
        self._checked = now
        try:
            mtime: float | None = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self.reload()

    def get(self, name: str) -> Account | None:
        return self._accounts.get(name)

    def role(self, name: str) -> Role | None:
        acc = self._accounts.get(name)
        return acc.role if acc is not None else None

    def all(self) -> list[Account]:
        return sorted(self._accounts.values(), key=lambda a: a.name)

    # ----------------------------------------------------------------- write

    def add(self, name: str, role: Role) -> Account:
        if not valid_account(name):
            raise ValueError(
                f"invalid account name {name!r}: letters, digits, _ . - "
                "(1-64, not starting with . or -)"
            )
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        acc = Account(name, role, round(time.time(), 3))
        self._accounts[name] = acc
        self.save()
        return acc

    def remove(self, name: str) -> bool:
        if self._accounts.pop(name, None) is None:
            return False
        self.save()
        return True

    def save(self) -> None:
        """Write atomically (temp file, fsync, rename), mode 0600."""
        doc = {
            "version": 1,
            "realm": self.realm,
            "accounts": {a.name: {"role": a.role, "created": a.created} for a in self.all()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".accounts-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._mtime = self.path.stat().st_mtime


def _parse(raw: Any) -> dict[str, Account]:
    if not isinstance(raw, dict) or not isinstance(raw.get("accounts"), dict):
        raise ValueError("expected an object with an 'accounts' object")  # noqa: TRY004
    out: dict[str, Account] = {}
    for name, entry in raw["accounts"].items():
        if not isinstance(name, str) or not valid_account(name) or not isinstance(entry, dict):
            raise ValueError(f"bad account entry {name!r}")
        role = entry.get("role")
        if role not in ROLES:
            raise ValueError(f"account {name!r} has an unknown role {role!r}")
        out[name] = Account(name, cast(Role, role), float(entry.get("created", 0.0)))
    return out
