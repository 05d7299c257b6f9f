"""A broker directory on disk: made by ``mtor broker init``, changed by
``add-node`` / ``add-user`` / ``revoke``, run by ``mosquitto -c DIR/mosquitto.conf``.

Layout (every file 0600 unless said; the directory 0700)::

    broker.json        how it is set up (:class:`~daemon.provision.conf.BrokerSettings`)
    accounts.json      the accounts and their roles (daemon.accounts; the orchestrator reads it)
    mosquitto.conf     generated
    passwd, acl        generated from accounts.json on every change
    ca.crt (0644), ca.key, server.crt (0644), server.key    TLS (unless --no-tls)
    clients/NAME/      config.yaml, password, ca.crt (and environment, for local daemons)
    mosquitto.pid, mosquitto.db   written by the broker (unless placed elsewhere)

After a change the running broker (its ``pid_file`` names it) gets SIGHUP and
rereads ``passwd`` and ``acl``.  Started as root, Mosquitto drops to its
``user``: the files it reads are chowned to that user, ``accounts.json`` to
the orchestrator's user, everything else stays the caller's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemon.accounts import ORCHESTRATOR_ACCOUNT, Account, Accounts, Role, valid_account
from daemon.errors import ConfigError
from daemon.provision import acl, passwd, tls
from daemon.provision.conf import (
    DEFAULT_PORT,
    DEFAULT_TLS_PORT,
    BrokerSettings,
    client_config,
    client_environment,
    is_local,
    mosquitto_conf,
)

log = logging.getLogger(__name__)

# The accounts every broker directory starts with.
ORCHESTRATOR: Final = ORCHESTRATOR_ACCOUNT  # the one name nodes take runs and state from
ADMIN: Final = "admin"
BASE_ACCOUNTS: Final[tuple[tuple[str, Role], ...]] = (
    (ORCHESTRATOR, "orchestrator"),
    (ADMIN, "sysop"),
)


class UsageError(ValueError):
    """A request the directory refuses (existing name, unknown account, ...)."""


@dataclass(frozen=True, slots=True)
class Issued:
    """An account just created or given a new password."""

    account: Account
    password: str
    client_dir: Path


def current_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def check_path(path: Path) -> Path:
    """Mosquitto's config parser splits at spaces: a path it names must have none."""
    if any(c.isspace() for c in str(path)):
        raise ConfigError(f"{path}: Mosquitto cannot use a path with spaces in it")
    return path


class BrokerDir:
    def __init__(self, path: Path) -> None:
        self.path = check_path(path.expanduser().resolve())

    # ------------------------------------------------------------------ paths

    @property
    def settings_file(self) -> Path:
        return self.path / "broker.json"

    @property
    def accounts_file(self) -> Path:
        return self.path / "accounts.json"

    @property
    def conf_file(self) -> Path:
        return self.path / "mosquitto.conf"

    @property
    def passwd_file(self) -> Path:
        return self.path / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.path / "acl"

    def client_dir(self, name: str) -> Path:
        return self.path / "clients" / name

    @property
    def initialised(self) -> bool:
        return self.settings_file.is_file() and self.accounts_file.is_file()

    # ------------------------------------------------------------------- init

    @classmethod
    def init(
        cls,
        path: Path,
        realm: str,
        *,
        port: int = DEFAULT_PORT,
        tls_port: int | None = DEFAULT_TLS_PORT,
        hosts: list[str] | None = None,
        ha_prefix: str = acl.DEFAULT_HA_PREFIX,
        broker_user: str | None = None,
        accounts_user: str | None = None,
        data_dir: Path | None = None,
        pid_file: Path | None = None,
        ca: tuple[Path, Path] | None = None,
        cert: tuple[Path, Path] | None = None,
        ca_cert_only: Path | None = None,
        local_accounts: list[str] | None = None,
    ) -> BrokerDir:
        """Make a new broker directory with the accounts orchestrator and admin.

        TLS: a generated CA (default), a CA brought in (``ca``: cert and key; the
        key is used once and not copied), or a server certificate brought in
        (``cert``, with ``ca_cert_only`` the CA clients should trust; without it
        they use the system CAs).
        """
        d = cls(path)
        if d.initialised:
            raise UsageError(f"{d.path} is already a broker directory (see mtor broker list)")
        for p in (port, tls_port):
            if p is not None and not 1 <= p <= 65535:
                raise UsageError(f"port {p} is not in 1..65535")
        if port == tls_port:
            raise UsageError("the plain and the TLS port must differ")
        me = current_user()
        settings = BrokerSettings(
            realm=realm,
            port=port,
            tls_port=tls_port,
            hosts=_hosts(hosts or []),
            ha_prefix=ha_prefix,
            broker_user=broker_user or me,
            accounts_user=accounts_user,
            data_dir=check_path((data_dir or d.path).resolve()),
            pid_file=check_path((pid_file or d.path / "mosquitto.pid").resolve()),
            local_accounts=sorted({ORCHESTRATOR, ADMIN, *(local_accounts or [])}),
        )
        for user in (settings.broker_user, accounts_user):
            if user is not None:
                _uid(user)  # exists?
        if settings.broker_user != me and os.geteuid() == 0:
            for what, where in (("data", settings.data_dir), ("pid", settings.pid_file.parent)):
                if where == d.path:
                    raise UsageError(
                        f"the broker runs as {settings.broker_user}: give --{what}-dir/"
                        f"--pid-file outside {d.path} that it can write"
                    )
        shared = settings.broker_user != me or (accounts_user not in (None, me))
        d.path.mkdir(parents=True, exist_ok=True)
        os.chmod(d.path, 0o711 if shared else 0o700)
        (d.path / "clients").mkdir(mode=0o700, exist_ok=True)
        if settings.tls:
            d._init_tls(settings, ca, cert, ca_cert_only)
        d._write(d.settings_file, settings.to_json())
        accounts = Accounts(d.accounts_file, realm)
        accounts.save()
        d._own_accounts(settings)
        for name, role in BASE_ACCOUNTS:
            d.add(name, role)
        log.info("made broker directory %s for realm %r", d.path, realm)
        return d

    def _init_tls(
        self,
        s: BrokerSettings,
        ca: tuple[Path, Path] | None,
        cert: tuple[Path, Path] | None,
        ca_cert_only: Path | None,
    ) -> None:
        s.cert_file, s.key_file = self.path / "server.crt", self.path / "server.key"
        ca_crt = self.path / "ca.crt"
        given = [*(cert or ()), *(ca or ()), *([ca_cert_only] if ca_cert_only else [])]
        for path in given:
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
        if cert is not None:
            shutil.copyfile(cert[0], s.cert_file)
            self._write(s.key_file, cert[1].read_text())
            if ca_cert_only is not None:
                shutil.copyfile(ca_cert_only, ca_crt)
                s.ca_file = ca_crt
        elif ca is not None:
            shutil.copyfile(ca[0], ca_crt)
            s.ca_file = ca_crt
            tls.make_server_cert(s.cert_file, s.key_file, ca_crt, ca[1], s.hosts)
        else:
            ca_key = self.path / "ca.key"
            tls.make_ca(ca_crt, ca_key, s.realm)
            s.ca_file = ca_crt
            tls.make_server_cert(s.cert_file, s.key_file, ca_crt, ca_key, s.hosts)
        os.chmod(s.key_file, 0o600)
        self._own(s.key_file, s.broker_user)
        for public in (s.cert_file, s.ca_file):
            if public is not None:
                os.chmod(public, 0o644)
                self._own(public, s.broker_user)

    # ------------------------------------------------------------------- read

    def settings(self) -> BrokerSettings:
        if not self.initialised:
            raise ConfigError(
                f"{self.path} is not a broker directory (make one with `mtor broker init`)"
            )
        try:
            return BrokerSettings.from_json(self.settings_file.read_text())
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{self.settings_file}: {exc}") from exc

    def accounts(self) -> Accounts:
        return Accounts(self.accounts_file, self.settings().realm)

    def password(self, name: str) -> str:
        """The account's password, from its client directory."""
        try:
            return (self.client_dir(name) / "password").read_text().strip()
        except OSError as exc:
            raise ConfigError(f"no password for account {name!r}: {exc.strerror}") from exc

    # ------------------------------------------------------------------ write

    def add(
        self, name: str, role: Role | None, *, rotate: bool = False, local: bool = False
    ) -> Issued:
        """Create an account (or, with ``rotate``, give an existing one a new password;
        ``role`` None then keeps its role)."""
        s = self.settings()
        accounts = Accounts(self.accounts_file, s.realm)
        existing = accounts.get(name)
        if existing is not None and not rotate:
            raise UsageError(
                f"account {name!r} exists ({existing.role}); --rotate gives it a new password"
            )
        if existing is None and rotate:
            raise UsageError(f"no account {name!r} to rotate")
        if existing is not None and role not in (None, existing.role):
            raise UsageError(
                f"account {name!r} is a {existing.role}, not a {role}: revoke it first"
            )
        role = existing.role if existing is not None else role
        if role is None:
            raise UsageError(f"account {name!r}: which role?")
        if not valid_account(name):
            raise UsageError(
                f"invalid account name {name!r}: letters, digits, _ . - "
                "(1-64 characters, not starting with . or -)"
            )
        if role == "node" and existing is None:
            self._check_node_name(name, accounts, s.realm)
        if local and name not in s.local_accounts:
            s.local_accounts = sorted({*s.local_accounts, name})
            self._write(self.settings_file, s.to_json())
        account = existing or accounts.add(name, role)
        self._own_accounts(s)
        password = passwd.new_password()
        hashes = self._hashes()
        hashes[name] = passwd.hash_password(password)
        cdir = self._write_client(s, account, password)
        self._regenerate(s, accounts, hashes)
        return Issued(account, password, cdir)

    def revoke(self, name: str) -> Account:
        s = self.settings()
        accounts = Accounts(self.accounts_file, s.realm)
        account = accounts.get(name)
        if account is None:
            raise UsageError(f"no account {name!r}")
        if name == ORCHESTRATOR:
            raise UsageError("the orchestrator account cannot be revoked (rotate it instead)")
        accounts.remove(name)
        self._own_accounts(s)
        if name in s.local_accounts:
            s.local_accounts.remove(name)
            self._write(self.settings_file, s.to_json())
        shutil.rmtree(self.client_dir(name), ignore_errors=True)
        self._regenerate(s, accounts, self._hashes())
        return account

    def set_port(self, port: int) -> None:
        """Move the plain listener (``mtor up`` when its port is taken); rewrites the
        config and the local clients' configurations."""
        s = self.settings()
        if s.port == port:
            return
        s.port = port
        self._write(self.settings_file, s.to_json())
        accounts = Accounts(self.accounts_file, s.realm)
        for account in accounts.all():
            if is_local(s, account.name) and (self.client_dir(account.name) / "password").exists():
                self._write_client(s, account, self.password(account.name))
        self._regenerate(s, accounts, self._hashes())

    def regenerate(self) -> None:
        """Rewrite mosquitto.conf, passwd and acl from broker.json and accounts.json."""
        s = self.settings()
        self._regenerate(s, Accounts(self.accounts_file, s.realm), self._hashes())

    def _regenerate(self, s: BrokerSettings, accounts: Accounts, hashes: dict[str, str]) -> None:
        names = [a.name for a in accounts.all() if a.name in hashes]
        for a in accounts.all():
            if a.name not in hashes:
                log.warning("account %s has no password hash: it cannot log in", a.name)
        self._write(self.passwd_file, passwd.render(hashes, names), s.broker_user)
        self._write(
            self.acl_file,
            acl.render([a for a in accounts.all() if a.name in names], s.realm, s.ha_prefix),
            s.broker_user,
        )
        self._write(self.conf_file, mosquitto_conf(s, self.path), s.broker_user)

    def _hashes(self) -> dict[str, str]:
        try:
            return passwd.parse(self.passwd_file.read_text())
        except FileNotFoundError:
            return {}

    def _check_node_name(self, name: str, accounts: Accounts, realm: str) -> None:
        # A node writes discovery configs under its Home Assistant device id: two
        # nodes (or a node and the realm device) must not share one.
        ha_id = acl.ha_node_id(realm, name)
        if ha_id == acl.ha_node_id(realm, acl.REALM_DEVICE_NODE):
            raise UsageError(f"a node may not be called {name!r}: it is the realm device's id")
        for other in accounts.all():
            if other.role == "node" and acl.ha_node_id(realm, other.name) == ha_id:
                raise UsageError(
                    f"node {name!r} would share Home Assistant id {ha_id} with {other.name!r}"
                )

    def _write_client(self, s: BrokerSettings, account: Account, password: str) -> Path:
        cdir = self.client_dir(account.name)
        cdir.mkdir(parents=True, exist_ok=True)
        os.chmod(cdir, 0o700)
        self._write(cdir / "password", password + "\n")
        local = is_local(s, account.name)
        if s.ca_file is not None and not local:
            shutil.copyfile(s.ca_file, cdir / "ca.crt")
            os.chmod(cdir / "ca.crt", 0o600)
        env = cdir / "environment"
        if local:
            self._write(env, client_environment(s, account, password))
        else:
            env.unlink(missing_ok=True)
        self._write(cdir / "config.yaml", client_config(s, account, cdir, self.accounts_file))
        return cdir

    # ------------------------------------------------------------ the broker

    def running_pid(self) -> int | None:
        """The pid of the broker running this directory's config, if one runs."""
        try:
            s = self.settings()
            pid = int(s.pid_file.read_text().strip())
        except (ConfigError, OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # A stale pid file may name some other process now: signal only a mosquitto.
        if not cmdline or not cmdline[0].endswith(b"mosquitto"):
            return None
        return pid

    def reload(self) -> int | None:
        """SIGHUP the running broker (it rereads passwd and acl); its pid, or None."""
        pid = self.running_pid()
        if pid is None:
            return None
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            return None
        except PermissionError as exc:
            raise ConfigError(
                f"cannot signal the broker (pid {pid}): run this as its owner or root, "
                "or `systemctl reload mosquitto`"
            ) from exc
        log.info("sent SIGHUP to the broker (pid %d)", pid)
        return pid

    # ------------------------------------------------------------------ files

    def _write(self, path: Path, text: str, owner: str | None = None) -> None:
        """Atomically, mode 0600, owned by ``owner`` when we are root."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            if owner is not None:
                self._own(Path(tmp), owner)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _own(self, path: Path, user: str | None) -> None:
        if user is None or os.geteuid() != 0:
            return
        uid, gid = _uid(user)
        if uid != os.geteuid():
            os.chown(path, uid, gid)

    def _own_accounts(self, s: BrokerSettings) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._own(self.accounts_file, s.accounts_user)


def _uid(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise ConfigError(f"no such user {user!r}") from exc
    return entry.pw_uid, entry.pw_gid


def _hosts(given: list[str]) -> list[str]:
    """The server certificate's names: those given, then this machine's name and loopback."""
    out = [tls.check_host(h) for h in given]
    for host in (socket.gethostname(), "localhost", "127.0.0.1"):
        with contextlib.suppress(ConfigError):  # a host name a certificate cannot hold
            out.append(tls.check_host(host))
    return list(dict.fromkeys(out))
