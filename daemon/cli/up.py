"""``mtor up``: the first-run experience.

Uses the configured broker if it answers; otherwise, when the broker URL
points at this machine and Mosquitto is installed, starts a private one (and
removes it on exit).  Then runs the realm's roles as child processes — the
same commands systemd runs — restarting any that crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Final

from daemon.broker import PrivateBroker, mosquitto_path, port_open
from daemon.cli.common import install_stop_signals
from daemon.config import Config
from daemon.errors import BusNotConnectedError

log = logging.getLogger(__name__)

LOCAL_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})
CHILD_RESTART_DELAY: Final = 2.0
CHILD_STOP_TIMEOUT: Final = 8.0

# The roles `mtor up` runs, each as its own process (as systemd runs them).
ROLES: list[str] = ["orchestrator", "node"]


def broker_reachable(config: Config) -> bool:
    ep = config.broker.endpoint
    if ep.transport == "unix":
        return os.path.exists(ep.host)
    return port_open(ep.host, ep.port)


async def run_child(
    role: str, broker_url: str, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    """Run ``mtor <role>`` until ``stop``; restart it if it dies on its own."""
    cmd = [sys.executable, "-m", "daemon.cli.main", role, "--broker", broker_url]
    if role == "node":
        cmd.append("--auto-nodes")
    for flag in ("config", "realm", "node_id", "log_level"):
        value = getattr(args, flag, None)
        if value:
            cmd += [f"--{flag.replace('_', '-')}", value]
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.DEVNULL)
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
        if code in (64, 77, 78):
            log.error("%s exited with %d (configuration or permission): not restarting", role, code)
            stop.set()
            return
        log.warning("%s exited with %s; restarting in %.0fs", role, code, CHILD_RESTART_DELAY)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CHILD_RESTART_DELAY):
                await stop.wait()


async def run_up(config: Config, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop)
    broker: PrivateBroker | None = None
    url = config.broker.url
    if not await asyncio.to_thread(broker_reachable, config):
        ep = config.broker.endpoint
        if args.no_broker or ep.host not in LOCAL_HOSTS or ep.scheme != "mqtt":
            raise BusNotConnectedError(f"no broker answers at {url}")
        if mosquitto_path() is None:
            raise BusNotConnectedError(
                f"no broker answers at {url} and mosquitto is not installed "
                "(run ./install.sh or apt-get install mosquitto)"
            )
        broker = PrivateBroker(ep.port if not port_open("127.0.0.1", ep.port) else None)
        await asyncio.to_thread(broker.start)
        url = broker.url
        log.info("started a private Mosquitto at %s (stopped on exit)", url)
    print(f"mtor up: realm '{config.realm}' on {url} — Ctrl-C to stop", file=sys.stderr)
    try:
        async with asyncio.TaskGroup() as tg:
            for role in ROLES:
                tg.create_task(run_child(role, url, args, stop))
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.cleanup)
    return 0
