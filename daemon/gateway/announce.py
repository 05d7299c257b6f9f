"""``mtor up``'s line with the dashboard's URL and its login token (as Jupyter prints)."""

from __future__ import annotations

import asyncio
import sys

from daemon.config import Config

# How often (s) `mtor up` looks for the gateway and the sysop token while they start,
# and for how long at most.
ANNOUNCE_POLL_S = 0.2
ANNOUNCE_WITHIN_S = 120.0


def dashboard_url(host: str, port: int, token: str) -> str:
    """The dashboard's address with the login token in its fragment: a fragment never
    leaves the browser (no server log, no Referer), and the page keeps it."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/#token={token}"


async def announce_dashboard(config: Config, port: int, stop: asyncio.Event) -> None:
    """``mtor up``: print the dashboard URL, with the sysop's token (the orchestrator
    writes it on its first start), once the gateway answers."""
    from pathlib import Path

    from daemon.broker import port_open

    token_file = Path(config.orchestrator.state_dir) / "sysop.token"
    host = config.gateway.host
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    loop = asyncio.get_running_loop()
    until = loop.time() + ANNOUNCE_WITHIN_S
    while not stop.is_set() and loop.time() < until:
        ready = await asyncio.to_thread(
            lambda: token_file.is_file() and port_open(probe, port, 0.2)
        )
        if ready:
            token = (await asyncio.to_thread(token_file.read_text)).strip()
            url = dashboard_url(host, port, token)
            print(
                f"mtor up: the dashboard is at {url}\n"
                f"         (that token is the sysop's API key too: Authorization: Bearer ...)",
                file=sys.stderr,
                flush=True,
            )
            return
        try:
            async with asyncio.timeout(ANNOUNCE_POLL_S):
                await stop.wait()
        except TimeoutError:
            pass
