"""Who is asking: a bearer API token to a realm user (the orchestrator's ``users.json``).

The tokens are the orchestrator's (``mtor admin user-add`` mints them; the
``sysop`` user's is in ``<state_dir>/sysop.token``).  The gateway reads the
same database, read-only, to know whom it serves before it asks the realm
anything; the orchestrator checks the token again on every request the
gateway relays (daemon.orchestrator.identity), so this check only decides
what the gateway itself shows (nodes, events) and refuses early.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from daemon.orchestrator.users import hash_token

log = logging.getLogger(__name__)

# How often (s) the users file's modification time is looked at; after an unknown
# token, every time (one stat: a user a sysop just added logs in at once).
RELOAD_CHECK_INTERVAL: Final = 1.0
RELOAD_CHECK_ON_MISS: Final = 0.0
# A token longer than this is not one the realm made (and not hashed for nothing).
MAX_TOKEN: Final = 256
ROLE_ALIASES: Final = {"device": "node"}
ROLES_SEEING_EVENTS: Final = frozenset({"sysop", "user", "node"})


@dataclass(frozen=True, slots=True)
class Principal:
    """A person (or program) the gateway serves, and the token that proves it."""

    name: str
    role: str
    token: str

    @property
    def sysop(self) -> bool:
        return self.role == "sysop"

    @property
    def sees_events(self) -> bool:
        """Guests see node state only (as their broker ACL would allow)."""
        return self.role in ROLES_SEEING_EVENTS


@dataclass(frozen=True, slots=True)
class _User:
    name: str
    role: str
    banned: bool


class TokenBook:
    """Token hash -> user, from the users file; reloaded when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, _User] = {}
        self._mtime: tuple[int, int] | None = None
        self._checked = float("-inf")

    def lookup(self, token: str, now: float | None = None) -> Principal | None:
        """The user of ``token``, or None (unknown, banned, or no users file)."""
        if not token or len(token) > MAX_TOKEN:
            return None
        now = time.monotonic() if now is None else now
        self._maybe_reload(now, RELOAD_CHECK_INTERVAL)
        hashed = hash_token(token)
        user = self._by_hash.get(hashed)
        if user is None:
            self._maybe_reload(now, RELOAD_CHECK_ON_MISS)
            user = self._by_hash.get(hashed)
        if user is None or user.banned:
            return None
        return Principal(user.name, user.role, token)

    def _maybe_reload(self, now: float, interval: float) -> None:
        if now - self._checked < interval:
            return
        self._checked = now
        try:
            st = self.path.stat()
            mtime: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            mtime = None
        if mtime == self._mtime:
            return
        self._mtime = mtime
        self._by_hash = self._read() if mtime is not None else {}

    def _read(self) -> dict[str, _User]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError) as exc:
            log.error(  # noqa: TRY400 - one line: the file is the fault
                "cannot read the users file %s: %s (nobody can log in)", self.path, exc
            )
            return {}
        return parse_users(raw)


def parse_users(raw: Any) -> dict[str, _User]:
    """TinyDB's layout: ``{"users": {"1": {"name", "role", "tokens": [sha256...], ...}}}``."""
    out: dict[str, _User] = {}
    table = raw.get("users") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        return out
    for doc in table.values():
        if not isinstance(doc, dict):
            continue
        name, role, tokens = doc.get("name"), doc.get("role"), doc.get("tokens")
        if not isinstance(name, str) or not isinstance(role, str) or not isinstance(tokens, list):
            continue
        user = _User(name, ROLE_ALIASES.get(role, role), bool(doc.get("banned")))
        for h in tokens:
            if isinstance(h, str):
                out[h] = user
    return out


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
