"""Shared pieces of the CLI: exit codes, options, a short-lived client bus."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from daemon.bus import Bus
from daemon.config import Config

# sysexits(3), so scripts and systemd (RestartPreventExitStatus) can tell them apart.
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 64
EXIT_UNAVAILABLE: Final = 69  # broker unreachable, nothing answered
EXIT_TEMPFAIL: Final = 75  # try again: an orchestrator that stepped down
EXIT_NOPERM: Final = 77  # broker refused credentials / authorisation
EXIT_CONFIG: Final = 78  # configuration invalid

# A sub-command handler: (parsed args, loaded config) -> exit code.
Command = Callable[[argparse.Namespace, Config], int]

# How long a one-shot command waits for the broker before giving up.
CONNECT_WAIT: Final = 5.0


COMMON_OPTIONS: Final = ("config", "broker", "realm", "node_id", "log_level")


def add_common_options(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    """The realm options, accepted before or after the sub-command.

    On sub-commands they default to SUPPRESS so an option given before the
    sub-command is not overwritten by the sub-parser's default.
    """
    d = argparse.SUPPRESS if sub else None
    g = parser.add_argument_group("realm options (also MTOR_CONFIG, MTOR_BROKER, ...)")
    g.add_argument("--config", "-c", metavar="FILE", default=d, help="config file (MTOR_CONFIG)")
    g.add_argument("--broker", "-b", metavar="URL", default=d, help="broker URL (MTOR_BROKER)")
    g.add_argument("--realm", "-r", metavar="NAME", default=d, help="realm name (MTOR_REALM)")
    g.add_argument("--node-id", "-n", metavar="ID", default=d, help="node id (MTOR_NODE_ID)")
    g.add_argument(
        "--log-level",
        default=d,
        choices=["debug", "info", "warning", "error"],
        help="override logging.level",
    )


@contextlib.asynccontextmanager
async def client_bus(config: Config, role: str = "cli") -> AsyncIterator[Bus]:
    """A connected bus for a one-shot command (no will, random client id).

    With no broker username configured, and ``mtor up``'s private broker running
    (from ``<daemon.state_dir>/broker``), it logs in there as that broker's
    ``admin`` account: the CLI beside ``mtor up`` needs no flags.  The bus's
    ``config.username`` is the identity the command acts as.
    """
    from daemon.provision.local import cli_credentials

    broker, password = config.broker, config.broker_password()
    found = cli_credentials(config)
    if found is not None:
        broker, password = found
    bus = Bus(broker, f"mtor-{role}-{uuid.uuid4().hex[:8]}", password=password)
    task = asyncio.create_task(bus.run())
    try:
        waiter = asyncio.create_task(bus.wait_connected(CONNECT_WAIT))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            waiter.cancel()
            task.result()  # raises BusAuthError
        await waiter
        yield bus
    finally:
        await bus.drain(1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def api_token(config: Config, given: str | None = None) -> str | None:
    """The API token a command sends: ``given`` (``--token``), ``MTOR_TOKEN``, else the
    sysop token the orchestrator wrote on this machine, when readable."""
    token = given or environ().get("MTOR_TOKEN")
    if token:
        return token
    path = Path(config.orchestrator.state_dir) / "sysop.token"
    if os.access(path, os.R_OK):
        return path.read_text().strip() or None
    return None


def environ() -> dict[str, str]:
    return dict(os.environ)
