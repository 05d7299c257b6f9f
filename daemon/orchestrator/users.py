"""Users, roles, API tokens and bans in TinyDB, written atomically.

Tokens are stored as SHA-256 hashes only.  Every write goes to a temp file
that is fsynced and renamed over the database, so a crash leaves either the
old or the new file, never a torn one.  TinyDB calls happen in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Final, Literal

from tinydb import Query, TinyDB
from tinydb.storages import Storage

Role = Literal["sysop", "user", "guest", "device"]
ROLES: Final = ("sysop", "user", "guest", "device")


class AtomicJSONStorage(Storage):
    """TinyDB storage: whole-file JSON, replaced atomically on every write."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return json.loads(text) if text.strip() else None

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def close(self) -> None:
        pass


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = TinyDB(str(path), storage=AtomicJSONStorage)
        self._users = self._db.table("users")
        self._cache: dict[str, dict[str, Any]] = {}
        self._by_token: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        self._cache = {u["name"]: dict(u) for u in self._users.all()}
        self._by_token = {t: u["name"] for u in self._cache.values() for t in u.get("tokens", [])}

    # Reads are served from memory (called on every submission).
    def get(self, name: str) -> dict[str, Any] | None:
        return self._cache.get(name)

    def by_token(self, token: str) -> dict[str, Any] | None:
        name = self._by_token.get(hash_token(token))
        return self._cache.get(name) if name else None

    def all(self) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in u.items() if k != "tokens"} | {"tokens": len(u.get("tokens", []))}
            for u in self._cache.values()
        ]

    # Writes go through a thread (fsync).
    async def add(self, name: str, role: Role) -> str:
        """Create or update a user; returns a new API token (shown once)."""
        token = secrets.token_urlsafe(24)

        def write() -> None:
            q = Query()
            existing = self._users.get(q.name == name)
            tokens = list(existing["tokens"]) if isinstance(existing, dict) else []
            tokens.append(hash_token(token))
            doc = {"name": name, "role": role, "tokens": tokens, "banned": False, "reason": None}
            if isinstance(existing, dict):
                doc["banned"] = existing.get("banned", False)
                doc["reason"] = existing.get("reason")
            self._users.upsert(doc, q.name == name)
            self._reload()

        await asyncio.to_thread(write)
        return token

    async def remove(self, name: str) -> bool:
        def write() -> bool:
            removed = self._users.remove(Query().name == name)
            self._reload()
            return bool(removed)

        return await asyncio.to_thread(write)

    async def set_ban(self, name: str, banned: bool, reason: str | None = None) -> None:
        def write() -> None:
            q = Query()
            if self._users.get(q.name == name) is None:
                self._users.insert(
                    {"name": name, "role": "user", "tokens": [], "banned": banned, "reason": reason}
                )
            else:
                self._users.update({"banned": banned, "reason": reason}, q.name == name)
            self._reload()

        await asyncio.to_thread(write)

    def close(self) -> None:
        self._db.close()
