"""Mosquitto's password file, written without ``mosquitto_passwd``.

Mosquitto 2's default hash is PBKDF2-SHA512 (``mosquitto_passwd -H
sha512-pbkdf2``): one line per user, ``name:$7$<iterations>$<salt b64>$<hash
b64>`` with a 12-byte salt, 101 iterations and a 64-byte derived key, base64
with padding.  Hashing here keeps passwords off command lines (``-b`` would
show them in ``ps``); the tests check a real Mosquitto accepts them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Final

# What mosquitto_passwd 2.0 writes (src/password_mosq.h: PW_DEFAULT_ITERATIONS, SALT_LEN).
ITERATIONS: Final = 101
SALT_BYTES: Final = 12
# Random bytes of a generated password (token_urlsafe: ~43 characters).
PASSWORD_BYTES: Final = 32


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``$7$...`` field of one password-file line."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return f"$7${ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify(password: str, hashed: str) -> bool:
    """Does ``password`` match a ``$7$`` hash (what the broker will decide)?"""
    try:
        _, kind, iterations, salt_b64, key_b64 = hashed.split("$")
        if kind != "7":
            return False
        salt, key = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got, key)


def parse(text: str) -> dict[str, str]:
    """``{name: hash}`` from a password file (blank and ``#`` lines ignored)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, hashed = line.split(":", 1)
        out[name] = hashed
    return out


def render(hashes: Mapping[str, str], names: Iterable[str]) -> str:
    """The password file for ``names`` (each must have a hash), sorted."""
    return "".join(f"{name}:{hashes[name]}\n" for name in sorted(names))
