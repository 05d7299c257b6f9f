"""``mtor up``: the first-run experience, closed by default.

Unless a broker is named (``--broker``, ``MTOR_BROKER``, a ``broker.url``
other than the built-in default in the config file, or a broker username),
it runs its private Mosquitto from a generated broker directory in the state
dir (``<daemon.state_dir>/broker``: passwords, ACL, made once and reused) on
127.0.0.1:1883, or another free port when that is taken — never a broker it
finds answering there.  A named broker is used as told (with a warning when
it lets anonymous clients in); a named local ``mqtt://`` one that does not
answer is started from the generated directory on its port.

Then it runs the realm's roles as child processes — the same commands
systemd runs — restarting any that crash: the orchestrator, a node daemon and
the HTTP gateway (127.0.0.1; it prints the dashboard's URL with a login
token).  With the private broker each child logs in with its own account (a
config file in ``broker/up/``: the user's config plus the account).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from daemon.accounts import GATEWAY_ACCOUNT
from daemon.broker import LOCAL_HOSTS, PrivateBroker, mosquitto_path, port_open
from daemon.cli.common import EXIT_CONFIG, EXIT_NOPERM, EXIT_USAGE, environ, install_stop_signals
from daemon.config import BrokerConfig, Config, find_config_file, read_yaml
from daemon.errors import BusNotConnectedError
from daemon.mqtt import ConnectParams, MqttError, connect

log = logging.getLogger(__name__)

CHILD_RESTART_DELAY: Final = 2.0
CHILD_STOP_TIMEOUT: Final = 8.0
# How long the anonymous-login probe of a named broker may take (s).
ANONYMOUS_PROBE_TIMEOUT: Final = 3.0
# The broker settings of the user's environment that the private broker's children
# must not inherit (their config file names their account).
BROKER_ENV: Final = ("MTOR_BROKER", "MTOR_BROKER_USERNAME", "MTOR_BROKER_PASSWORD")

# The roles `mtor up` runs, each as its own process (as systemd runs them).
ROLES: list[str] = ["orchestrator", "node", "gateway"]


def roles() -> list[str]:
    """The roles to run: the gateway only where its packages are (the gateway extra)."""
    import importlib.util

    if all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn")):
        return ROLES
    log.warning("no HTTP gateway: fastapi/uvicorn missing (pip install 'mtor[gateway]')")
    return [r for r in ROLES if r != "gateway"]


def gateway_port(config: Config) -> int:
    """``gateway.port``, or a free one when something else listens there."""
    from daemon.broker import free_port

    port = config.gateway.port
    return port if not port_open(config.gateway.host, port) else free_port(config.gateway.host)


def broker_reachable(config: Config) -> bool:
    ep = config.broker.endpoint
    if ep.transport == "unix":
        return os.path.exists(ep.host)
    return port_open(ep.host, ep.port)


def broker_named(config: Config, args: argparse.Namespace, env: Mapping[str, str]) -> bool:
    """Did the user name a broker?  The shipped config.yaml spells out every default,
    so a ``broker.url`` equal to the built-in default does not count."""
    b = config.broker
    if getattr(args, "broker", None) or env.get("MTOR_BROKER") or b.username is not None:
        return True
    return "url" in b.model_fields_set and b.url != BrokerConfig().url


async def accepts_anonymous(broker: BrokerConfig) -> bool:
    """Does the broker let a client in without credentials?  (One CONNECT.)"""
    ep = broker.endpoint
    tls = None
    if ep.tls:  # not the Bus's context: a client certificate is a credential too
        ca = broker.tls.ca_file
        tls = ssl.create_default_context(cafile=str(ca) if ca else None)
        if broker.tls.insecure:
            tls.check_hostname = False
    params = ConnectParams(
        host=ep.host,
        port=ep.port,
        client_id=f"mtor-up-probe-{uuid.uuid4().hex[:8]}",
        transport=ep.transport,
        websocket_path=ep.path or "/",
        tls=tls,
        connect_timeout=ANONYMOUS_PROBE_TIMEOUT,
    )
    try:
        conn = await connect(params)
    except (MqttError, OSError, ssl.SSLError):
        return False
    await conn.close()
    return True


async def run_child(
    role: str, cmd: list[str], env: dict[str, str] | None, stop: asyncio.Event
) -> None:
    """Run ``cmd`` until ``stop``; restart it if it dies on its own."""
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL, env=env)
        log.info("started %s (pid %d)", role, proc.pid)
        waiter = asyncio.create_task(proc.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    async with asyncio.timeout(CHILD_STOP_TIMEOUT):
                        await waiter
                except TimeoutError:
                    proc.kill()
                    await waiter
            return
        code = proc.returncode
        if code in (EXIT_USAGE, EXIT_NOPERM, EXIT_CONFIG):
            log.error("%s exited with %d (configuration or permission): not restarting", role, code)
            stop.set()
            return
        log.warning("%s exited with %s; restarting in %.0fs", role, code, CHILD_RESTART_DELAY)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CHILD_RESTART_DELAY):
                await stop.wait()


def child_command(role: str, args: argparse.Namespace, config_file: Path | None) -> list[str]:
    """``mtor <role>`` with the flags ``mtor up`` was given (``--config``: ``config_file``)."""
    cmd = [sys.executable, "-m", "daemon.cli.main", role]
    if role == "node":
        cmd.append("--auto-nodes")
    if role == "gateway":
        cmd += ["--port", str(args.gateway_port)]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    for flag in ("realm", "node_id", "log_level"):
        value = getattr(args, flag, None)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", value]
    return cmd


async def run_up(config: Config, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    env = environ()
    url = config.broker.url
    port: int | None = None  # where the private broker must listen (a named local URL)
    if broker_named(config, args, env) or args.no_broker:
        if await asyncio.to_thread(broker_reachable, config):
            if await accepts_anonymous(config.broker):
                log.warning(
                    "the broker at %s lets anonymous clients in: anyone who reaches it can "
                    "read and write the whole realm (docs/broker.md: mtor broker init)",
                    url,
                )
            given = Path(args.config) if args.config else None
            args.gateway_port = gateway_port(config)
            cmds = {r: [*child_command(r, args, given), "--broker", url] for r in roles()}
            print(f"mtor up: realm '{config.realm}' on {url} — Ctrl-C to stop", file=sys.stderr)
            await _run_children(cmds, None, stop, config, args.gateway_port)
            return 0
        ep = config.broker.endpoint
        if (
            args.no_broker
            or ep.host not in LOCAL_HOSTS
            or ep.scheme != "mqtt"
            or config.broker.username is not None
        ):
            raise BusNotConnectedError(f"no broker answers at {url}")
        port = ep.port
    return await _run_private(config, args, env, port, stop)


async def _run_private(
    config: Config,
    args: argparse.Namespace,
    env: dict[str, str],
    port: int | None,
    stop: asyncio.Event,
) -> int:
    from daemon.provision.brokerdir import ORCHESTRATOR
    from daemon.provision.local import child_config, prepare

    if mosquitto_path() is None:
        raise BusNotConnectedError(
            "mosquitto is not installed (run ./install.sh or apt-get install mosquitto)"
        )
    local = await asyncio.to_thread(prepare, config, port)
    broker: PrivateBroker | None = None
    if local.running:
        log.info("the private broker of %s already runs: using it", local.dir.path)
    else:
        broker = PrivateBroker.generated(local.dir.conf_file, local.port)
        await asyncio.to_thread(broker.start)
        log.info("started the private Mosquitto at %s (%s)", local.url, local.dir.path)
    try:
        used = find_config_file(getattr(args, "config", None), env)
        user_config = read_yaml(used) if used else {}
        accounts = {
            "orchestrator": ORCHESTRATOR,
            "node": config.effective_node_id,
            "gateway": GATEWAY_ACCOUNT,
        }
        args.gateway_port = gateway_port(config)
        cmds = {
            r: child_command(r, args, child_config(local, accounts[r], user_config, r))
            for r in roles()
        }
        child_env = {k: v for k, v in env.items() if k not in BROKER_ENV}
        print(
            f"mtor up: realm '{config.realm}' on {local.url} (private broker, accounts in "
            f"{local.dir.path}) — Ctrl-C to stop",
            file=sys.stderr,
        )
        await _run_children(cmds, child_env, stop, config, args.gateway_port)
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.cleanup)
    return 0


async def _run_children(
    cmds: dict[str, list[str]],
    env: dict[str, str] | None,
    stop: asyncio.Event,
    config: Config,
    gateway_port: int,
) -> None:
    from daemon.cli.ready import announce_ready
    from daemon.gateway.announce import announce_dashboard

    async with asyncio.TaskGroup() as tg:
        for role, cmd in cmds.items():
            tg.create_task(run_child(role, cmd, env, stop))
        tg.create_task(announce_ready(config, config.effective_node_id, stop))
        if "gateway" in cmds:
            tg.create_task(announce_dashboard(config, gateway_port, stop))
