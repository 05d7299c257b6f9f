"""``mtor gateway``: the realm over HTTP (OpenAI-compatible API, REST, WebSocket, dashboard)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from daemon.cli.common import EXIT_OK, Command, install_stop_signals
from daemon.config import Config


def add_commands(sub: Any, common: argparse.ArgumentParser) -> dict[str, Command]:
    gw = sub.add_parser(
        "gateway",
        help="serve the realm over HTTP: OpenAI-compatible API, REST, WebSocket, dashboard",
        description="Serve the realm over HTTP (docs/gateway.md). Log in with a realm "
        "user's API token (mtor admin user-add, or the sysop token).",
        parents=[common],
    )
    gw.add_argument("--host", help="address to listen on (default gateway.host: 127.0.0.1)")
    gw.add_argument("--port", type=int, help="TCP port (default gateway.port: 8080)")
    return {"gateway": cmd_gateway}


def cmd_gateway(args: argparse.Namespace, config: Config) -> int:
    from daemon.cli.main import run_async
    from daemon.gateway.server import run_gateway

    update: dict[str, Any] = {}
    if args.host:
        update["host"] = args.host
    if args.port:
        update["port"] = args.port
    if update:
        gateway = config.gateway.model_validate({**config.gateway.model_dump(), **update})
        config = config.model_copy(update={"gateway": gateway})

    def ready(url: str) -> None:
        print(f"mtor gateway: {url} (API docs at {url}/docs)", file=sys.stderr, flush=True)

    async def main() -> int:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run_gateway(config, stop, ready=ready)
        return EXIT_OK

    return run_async(main())
