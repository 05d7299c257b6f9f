"""Request size limits, enforced while the body arrives (ASGI middleware).

A declared ``Content-Length`` over the limit is refused before any byte is
read; a body that grows past it (chunked) is cut off with the same 413.  Uploads
(``multipart/form-data``) have their own, larger limit.
"""

from __future__ import annotations

import json
from typing import Any

from daemon.gateway.errors import error_body

Scope = dict[str, Any]
# A body declared up to this many times the limit is read (and dropped) after the 413,
# so an ordinary client sees the answer instead of a reset; a larger one is cut off.
DRAIN_FACTOR = 16
Message = dict[str, Any]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: Any, *, max_body: int, max_upload: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        limit = self.max_upload if ctype.startswith("multipart/") else self.max_body
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if length > limit:
                drain = length <= DRAIN_FACTOR * limit  # the client finishes, reads the 413
                await _refuse(send, 413, "too_large", f"request body over {limit} bytes", drain)
                if drain:
                    await _drain(receive)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message: Message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, 413, "too_large", f"request body over {limit} bytes")


async def _drain(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _refuse(send: Any, status: int, code: str, message: str, keep_open: bool = False) -> None:
    body = json.dumps(error_body(status, code, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if not keep_open:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
