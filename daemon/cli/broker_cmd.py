"""``mtor broker init|add-node|add-user|revoke|list`` — the realm's generated
broker configuration (accounts, ACL, TLS) and the client files of each account.

Every change rewrites the password file and the ACL from ``accounts.json`` and
sends the running broker SIGHUP.  See docs/broker.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, Command
from daemon.config import Config
from daemon.errors import ConfigError

if TYPE_CHECKING:
    from daemon.accounts import Role
    from daemon.provision.brokerdir import BrokerDir, Issued

USER_ROLES = ("user", "guest", "sysop", "homeassistant", "gateway")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    help_text = "generated broker configuration: accounts, ACL, TLS, client files"
    broker = sub.add_parser("broker", help=help_text, description=help_text, parents=[common])
    actions = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, help=text, description=text, parents=[common]
        )
        return p

    def dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            metavar="DIR",
            type=Path,
            help="the broker directory (default: <daemon.state_dir>/broker, mtor up's)",
        )

    init = action("init", "make a broker directory (the realm is --realm or the config's)")
    init.add_argument("directory", metavar="DIR", type=Path, help="the broker directory to make")
    init.add_argument("--port", type=int, default=1883, help="plain listener on 127.0.0.1")
    init.add_argument("--tls-port", type=int, default=8883, help="TLS listener on 0.0.0.0")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name or address devices dial (repeat; the first goes into their configs)",
    )
    init.add_argument("--ha-prefix", metavar="PREFIX", help="Home Assistant discovery prefix")
    init.add_argument("--no-tls", action="store_true", help="loopback listener only")
    init.add_argument("--ca-cert", metavar="FILE", type=Path, help="a CA of your own ...")
    init.add_argument("--ca-key", metavar="FILE", type=Path, help="... and its key")
    init.add_argument("--cert", metavar="FILE", type=Path, help="a server certificate ...")
    init.add_argument("--key", metavar="FILE", type=Path, help="... and its key")
    init.add_argument("--broker-user", metavar="USER", help="Mosquitto's user (default: you)")
    init.add_argument(
        "--accounts-user", metavar="USER", help="owner of accounts.json (the orchestrator's user)"
    )
    init.add_argument("--data-dir", metavar="DIR", type=Path, help="persistence (default: DIR)")
    init.add_argument("--pid-file", metavar="FILE", type=Path, help="default: DIR/mosquitto.pid")

    node = action("add-node", "an account for a node daemon (its name is its node id)")
    node.add_argument("name", metavar="NAME", help="the node's account (its node id)")
    user = action("add-user", "an account for a person or for Home Assistant")
    user.add_argument("name", metavar="NAME", help="the person's account")
    user.add_argument("--role", choices=USER_ROLES, help="default: user")
    for p in (node, user):
        p.add_argument(
            "--rotate", action="store_true", help="give an existing account a new password"
        )
        p.add_argument(
            "--local", action="store_true", help="it runs on this machine (plain loopback listener)"
        )
        dir_option(p)
    revoke = action("revoke", "remove an account (the broker refuses it from now on)")
    revoke.add_argument("name", metavar="NAME", help="the account to remove")
    dir_option(revoke)
    ls = action("list", "the accounts and their roles")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    dir_option(ls)
    return {"broker": cmd_broker}


def cmd_broker(args: argparse.Namespace, config: Config) -> int:
    from daemon.provision.brokerdir import UsageError

    handler = {
        "init": _init,
        "add-node": _add,
        "add-user": _add,
        "revoke": _revoke,
        "list": _list,
    }[args.broker_command]
    try:
        return handler(args, config)
    except UsageError as exc:
        print(f"mtor broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"mtor broker: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _dir(args: argparse.Namespace, config: Config) -> BrokerDir:
    from daemon.provision.brokerdir import BrokerDir

    return BrokerDir(args.dir or config.daemon.state_dir / "broker")


def _init(args: argparse.Namespace, config: Config) -> int:
    from daemon.provision.brokerdir import BrokerDir, UsageError

    if args.no_tls and (args.ca_cert or args.ca_key or args.cert or args.key):
        raise UsageError("--no-tls takes no certificates")
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together")
    if args.ca_key and not args.ca_cert:
        raise UsageError("--ca-key needs --ca-cert")
    if args.ca_cert and not (args.ca_key or args.cert):
        raise UsageError("--ca-cert needs --ca-key (to sign a server certificate) or --cert")
    d = BrokerDir.init(
        args.directory,
        config.realm,
        port=args.port,
        tls_port=None if args.no_tls else args.tls_port,
        hosts=args.host,
        ha_prefix=args.ha_prefix or config.homeassistant.discovery_prefix,
        broker_user=args.broker_user,
        accounts_user=args.accounts_user,
        data_dir=args.data_dir,
        pid_file=args.pid_file,
        ca=(args.ca_cert, args.ca_key) if args.ca_key else None,
        cert=(args.cert, args.key) if args.cert else None,
        ca_cert_only=args.ca_cert if args.cert else None,
    )
    s = d.settings()
    print(f"broker directory {d.path} for realm {s.realm!r}")
    print(f"  run it:     mosquitto -c {d.conf_file}")
    listeners = f"mqtt://127.0.0.1:{s.port} (this machine)"
    if s.tls:
        ca = f"CA {s.ca_file}" if s.ca_file else "a publicly trusted certificate"
        listeners += f", mqtts://{s.hosts[0]}:{s.tls_port} (TLS, {ca})"
    print(f"  listeners:  {listeners}")
    print("  accounts:   " + ", ".join(f"{a.name} ({a.role})" for a in d.accounts().all()))
    print(f"  orchestrator: mtor orchestrator --config {d.client_dir('orchestrator')}/config.yaml")
    print(f"  add devices:  mtor broker add-node NAME --dir {d.path}")
    return EXIT_OK


def _add(args: argparse.Namespace, config: Config) -> int:
    d = _dir(args, config)
    role: Role | None = "node" if args.broker_command == "add-node" else args.role
    if role is None and not args.rotate:
        role = "user"
    issued = d.add(args.name, role, rotate=args.rotate, local=args.local)
    what = "given a new password" if args.rotate else "created"
    print(
        f"{issued.account.name}: {issued.account.role} account {what}; files in {issued.client_dir}"
    )
    _say_reload(d)
    for line in _how_to_use(d, issued):
        print(line)
    return EXIT_OK


def _revoke(args: argparse.Namespace, config: Config) -> int:
    d = _dir(args, config)
    account = d.revoke(args.name)
    print(f"{account.name}: {account.role} account removed")
    _say_reload(d)
    return EXIT_OK


def _list(args: argparse.Namespace, config: Config) -> int:
    d = _dir(args, config)
    s = d.settings()
    accounts = d.accounts().all()
    if args.json:
        doc = {
            "dir": str(d.path),
            "realm": s.realm,
            "running_pid": d.running_pid(),
            "accounts": [{"name": a.name, "role": a.role, "created": a.created} for a in accounts],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    pid = d.running_pid()
    state = f"running (pid {pid})" if pid else "not running"
    print(f"broker directory {d.path}, realm {s.realm!r}, broker {state}")
    print(f"{'NAME':<24} {'ROLE':<14} CREATED")
    for a in accounts:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(a.created)) if a.created else "?"
        print(f"{a.name:<24} {a.role:<14} {created}")
    return EXIT_OK


def _say_reload(d: BrokerDir) -> None:
    pid = d.reload()
    if pid is None:
        print("broker not running: the change applies when it starts")
    else:
        print(f"broker reloaded (SIGHUP to pid {pid})")


def _how_to_use(d: BrokerDir, issued: Issued) -> list[str]:
    from daemon.provision.conf import client_url, is_local

    s = d.settings()
    name, role = issued.account.name, issued.account.role
    cdir = issued.client_dir
    config_yaml = cdir / "config.yaml"
    if role == "homeassistant":
        url = client_url(s, name)
        host, _, port = url.split("://", 1)[1].rpartition(":")
        tls = f", TLS with the CA {cdir / 'ca.crt'}" if not is_local(s, name) and s.ca_file else ""
        return [
            f"Home Assistant's MQTT integration: broker {host}, port {port}, username {name}, "
            f"password in {cdir / 'password'}{tls}"
        ]
    command = "node" if role == "node" else "status"
    if is_local(s, name):
        return [f"run here: mtor {command} --config {config_yaml}"]
    device = f"mtor-{name}"
    target = name if role == "node" else "DEVICE"
    remote = shlex.quote(f"cd {device} && mtor {command} --config config.yaml")
    return [
        f"join: scp -r {cdir} {target}:{device} && ssh {target} {remote}",
        f"      ({target}: the device's ssh name; mtor: the full path of its mtor command, "
        "e.g. /opt/mtor/venv/bin/mtor; the paths in config.yaml are relative to its directory)",
    ]
