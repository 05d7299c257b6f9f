"""The WebSocket (``/api/ws``): the realm's live picture and task progress, pushed.

A browser cannot set an Authorization header on a WebSocket, and a token in
the URL ends up in logs and history, so the first frame is the login:
``{"token": "<API token>"}`` within :data:`LOGIN_TIMEOUT`.  The Origin of a
browser's handshake must be the gateway's own (or one in
``gateway.ws_origins``): another site's page cannot ride on a token the
browser holds.  Then the client gets ``{"kind": "snapshot", ...}`` and every
change as ``{"kind": "node" | "event" | "stats" | "orchestrator" | "task", "ts", "data"}``;
``{"kind": "ping"}`` every :data:`PING_S` seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Final
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from daemon.gateway.hub import Subscriber
from daemon.gateway.ports import Ports

log = logging.getLogger(__name__)

router = APIRouter()

LOGIN_TIMEOUT: Final = 10.0
PING_S: Final = 25.0
MAX_LOGIN_FRAME: Final = 1024
# Close codes (RFC 6455 §7.4: 4000-4999 are the application's).
POLICY: Final = 1008
UNAUTHORIZED: Final = 4401
FULL: Final = 1013


def origin_allowed(origin: str | None, host: str | None, extra: list[str]) -> bool:
    """No Origin: not a browser.  Else the page's origin must be this server's."""
    if origin is None:
        return True
    if origin in extra:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host


@router.websocket("/api/ws")
async def live(ws: WebSocket) -> None:
    ports: Ports = ws.app.state.ports
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), ports.cfg.ws_origins):
        await ws.close(code=POLICY, reason="origin not allowed")
        return
    hub = ports.hub
    if len(hub.subscribers) >= ports.cfg.max_ws_clients:
        await ws.close(code=FULL, reason="too many clients")
        return
    await ws.accept()
    try:
        async with asyncio.timeout(LOGIN_TIMEOUT):
            first = await ws.receive_text()
    except (TimeoutError, WebSocketDisconnect, KeyError, RuntimeError):
        with contextlib.suppress(RuntimeError):
            await ws.close(code=UNAUTHORIZED, reason='log in with {"token": ...} first')
        return
    token = _token(first)
    who = ports.tokens.lookup(token) if token else None
    if who is None:
        await ws.close(code=UNAUTHORIZED, reason="invalid API token")
        return
    sub = hub.subscribe(who)
    reader = asyncio.create_task(_drain(ws, sub))
    try:
        await ws.send_text(json.dumps({"kind": "snapshot", "data": hub.snapshot(who)}))
        while True:
            try:
                async with asyncio.timeout(PING_S):
                    text = await sub.queue.get()
            except TimeoutError:
                text = '{"kind": "ping"}'
            if not text:  # the client is gone
                break
            await ws.send_text(text)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        hub.unsubscribe(sub)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _drain(ws: WebSocket, sub: Subscriber) -> None:
    """Read (and ignore) what the client sends, so its close is seen at once."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, KeyError):
        while True:
            await ws.receive_text()
    sub.offer("")


def _token(frame: str) -> str | None:
    if len(frame) > MAX_LOGIN_FRAME:
        return None
    try:
        doc = json.loads(frame)
    except ValueError:
        return None
    token = doc.get("token") if isinstance(doc, dict) else None
    return token if isinstance(token, str) else None
