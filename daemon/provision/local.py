"""``mtor up``'s private broker: a generated broker directory in the state dir.

``<daemon.state_dir>/broker/`` is made once (loopback listener only, accounts
``orchestrator``, ``admin``, ``gateway`` and the node daemon's) and reused, so credentials
stay stable across runs; a directory made by ``mtor broker init`` there
(``install.sh --secure``) is used as it is.  The children of ``mtor up`` get a
config file each (``up/<role>.yaml``): the user's own config with the broker
account filled in.  The local CLI finds the ``admin`` account here by itself
(:func:`cli_credentials`) while that broker runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from daemon.accounts import GATEWAY_ACCOUNT
from daemon.broker import LOCAL_HOSTS, free_port, port_open
from daemon.config import BrokerConfig, Config, parse_broker_url, read_yaml
from daemon.errors import BrokerStartError, ConfigError
from daemon.provision.brokerdir import ADMIN, ORCHESTRATOR, BrokerDir
from daemon.provision.conf import DEFAULT_PORT, LOOPBACK

log = logging.getLogger(__name__)

BROKER_SUBDIR: Final = "broker"


def broker_dir(config: Config) -> BrokerDir:
    return BrokerDir(config.daemon.state_dir / BROKER_SUBDIR)


@dataclass(frozen=True, slots=True)
class LocalBroker:
    """The private broker's directory, where its plain listener is, and whether it
    already runs (another ``mtor up``, or started by hand)."""

    dir: BrokerDir
    port: int
    running: bool

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"


def prepare(config: Config, port: int | None = None) -> LocalBroker:
    """Make or reuse the directory, with an account for this daemon's node.

    ``port``: the plain listener must be there (a broker URL named in the
    config); None: 1883 when free, else the port of the last run, else any.
    """
    d = broker_dir(config)
    node = config.effective_node_id
    if not d.initialised:
        d.path.parent.mkdir(parents=True, exist_ok=True)
        BrokerDir.init(
            d.path,
            config.realm,
            port=port or DEFAULT_PORT,
            tls_port=None,
            ha_prefix=config.homeassistant.discovery_prefix,
        )
        log.info("made the private broker's directory %s", d.path)
    s = d.settings()
    if s.realm != config.realm:
        raise ConfigError(
            f"{d.path} is the broker of realm {s.realm!r}, the config says {config.realm!r}: "
            f"use that realm, or another daemon.state_dir (or remove {d.path})"
        )
    accounts = d.accounts()
    existing = accounts.get(node)
    if existing is None:
        d.add(node, "node", local=True)
    elif existing.role != "node":
        raise ConfigError(f"account {node!r} of {d.path} is a {existing.role}, not a node")
    gateway = accounts.get(GATEWAY_ACCOUNT)  # directories made before the gateway lack it
    if gateway is None:
        d.add(GATEWAY_ACCOUNT, "gateway", local=True)
    elif gateway.role != "gateway":
        raise ConfigError(
            f"account {GATEWAY_ACCOUNT!r} of {d.path} is a {gateway.role}, not the gateway"
        )
    if d.running_pid() is not None:
        return LocalBroker(d, s.port, running=True)
    chosen = port or _free_choice(s.port)
    if s.tls_port is not None and port_open(LOOPBACK, s.tls_port):
        raise BrokerStartError(f"the TLS port {s.tls_port} of {d.path} is taken by another program")
    d.set_port(chosen)
    d.regenerate()  # the config as this version of mtor writes it
    return LocalBroker(d, chosen, running=False)


def _free_choice(last: int) -> int:
    for candidate in (DEFAULT_PORT, last):
        if not port_open(LOOPBACK, candidate):
            return candidate
    return free_port(LOOPBACK)


def child_config(local: LocalBroker, account: str, user_config: dict[str, Any], role: str) -> Path:
    """``up/<role>.yaml``: the user's config with the broker account of ``account``."""
    d = local.dir
    data = dict(user_config)
    broker = dict(data.get("broker") or {})
    broker.update(
        url=local.url,
        username=account,
        password=None,
        password_file=str(d.client_dir(account) / "password"),
    )
    data["broker"] = broker
    if account == ORCHESTRATOR:
        data["orchestrator"] = {
            **(data.get("orchestrator") or {}),
            "accounts_file": str(d.accounts_file),
        }
    else:
        data["node_id"] = account
    out = d.path / "up"
    out.mkdir(mode=0o700, exist_ok=True)
    path = out / f"{role}.yaml"
    head = f"# Written by `mtor up` for its {role}: the user's config plus the broker account.\n"
    path.touch(mode=0o600)
    path.write_text(head + yaml.safe_dump(data, sort_keys=False))
    return path


def cli_credentials(config: Config) -> tuple[BrokerConfig, str] | None:
    """The ``admin`` (sysop) account for the local CLI: of ``mtor up``'s running
    private broker, else of the generated broker whose ``accounts.json`` the config
    names (``install.sh --system``: ``/etc/mtor/broker``, readable by root), so
    ``sudo mtor admin ...`` needs no token on the command line (where ``ps`` shows it).

    Only when the config names no broker username, and its URL is the default
    or that broker's own (so a password never goes to another broker).
    """
    b = config.broker
    if b.username is not None:
        return None
    return _private_admin(config) or _system_admin(config)


def _system_admin(config: Config) -> tuple[BrokerConfig, str] | None:
    accounts = config.orchestrator.accounts_file
    if accounts is None:
        return None
    d = BrokerDir(accounts.parent)
    client = d.client_dir(ADMIN)
    with contextlib.suppress(ConfigError, OSError, ValueError):
        if not os.access(client / "password", os.R_OK) or d.settings().realm != config.realm:
            return None
        section = read_yaml(client / "config.yaml").get("broker")
        if not isinstance(section, dict):
            return None
        section.pop("password_file", None)  # read below, from the same directory
        tls = section.get("tls")
        if isinstance(tls, dict) and tls.get("ca_file"):  # relative to the client dir
            tls["ca_file"] = str(client / tls["ca_file"])
        admin = BrokerConfig.model_validate(section)
        if config.broker.url != BrokerConfig().url and not _same_endpoint(
            config.broker.url, admin.url
        ):
            return None
        return admin, d.password(ADMIN)
    return None


def _private_admin(config: Config) -> tuple[BrokerConfig, str] | None:
    b = config.broker
    d = broker_dir(config)
    with contextlib.suppress(ConfigError, OSError):
        if not (d.client_dir(ADMIN) / "password").is_file() or d.running_pid() is None:
            return None
        s = d.settings()
        if s.realm != config.realm:
            return None
        url = f"mqtt://{LOOPBACK}:{s.port}"
        if b.url != BrokerConfig().url and not _same_endpoint(b.url, url):
            return None
        password = d.password(ADMIN)
        return b.model_copy(update={"url": url, "username": ADMIN}), password
    return None


def _same_endpoint(a: str, b: str) -> bool:
    ea, eb = parse_broker_url(a), parse_broker_url(b)
    if (ea.scheme, ea.port) != (eb.scheme, eb.port):
        return False
    return ea.host == eb.host or {ea.host, eb.host} <= LOCAL_HOSTS
