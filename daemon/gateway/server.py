"""Runs the gateway: the bus, the realm side, and uvicorn in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Final

import uvicorn

from daemon.bus import Bus
from daemon.config import Config
from daemon.errors import MtorError
from daemon.gateway.app import create_app
from daemon.gateway.auth import TokenBook
from daemon.gateway.hub import Hub
from daemon.gateway.ports import Ports
from daemon.gateway.realm import GatewayRealm

log = logging.getLogger(__name__)

# Seconds open requests (streams, WebSockets) get to finish on stop.
GRACEFUL_STOP_S: Final = 3
# Largest WebSocket frame a client may send (only the login frame is read).
WS_MAX_FRAME: Final = 64 * 1024
# Open connections at most (HTTP keep-alive and WebSockets together); past it, 503.
MAX_CONNECTIONS: Final = 2000


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the command's stop event ends it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so a taken port is a clear error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and with proto 0 every small response waited ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise MtorError(f"the gateway cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}" if ":" not in shown else f"http://[{shown}]:{port}"


async def run_gateway(
    config: Config,
    stop: asyncio.Event,
    *,
    sock: socket.socket | None = None,
    ready: Callable[[str], None] | None = None,
) -> None:
    cfg = config.gateway
    users_file = cfg.users_file or config.orchestrator.state_dir / "users.json"
    bus = Bus(config.broker, config.daemon_client_id("gateway"), password=config.broker_password())
    hub = Hub()
    realm = GatewayRealm(bus, config.realm, hub, cfg.task_timeout)
    app = create_app(Ports(cfg, realm, hub, TokenBook(users_file)))
    sock = sock or listen(cfg.host, cfg.port)
    server = _Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws_max_size=WS_MAX_FRAME,
            limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=GRACEFUL_STOP_S,
            server_header=False,
        )
    )
    async with asyncio.TaskGroup() as tg:
        bus_task = tg.create_task(bus.run())
        await realm.start()
        serving = tg.create_task(server.serve(sockets=[sock]))
        url = url_of(sock)
        log.info("gateway on %s (realm %r, users %s)", url, config.realm, users_file)
        if ready is not None:
            ready(url)
        stopper = tg.create_task(stop.wait())
        await asyncio.wait({bus_task, serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopper.cancel()
        await serving
        await realm.close()
        await bus.drain(1.0)
        bus_task.cancel()
