"""MQTT over WebSocket (RFC 6455, subprotocol ``mqtt``) for ``ws://`` and ``wss://`` brokers.

A thin layer under :class:`~daemon.mqtt.connection.Connection`: it performs
the HTTP upgrade, then hands the connection the payload of every binary frame
(MQTT does not care where frames split the stream) and wraps what the
connection writes in masked binary frames.  Pings are answered; a close frame
closes the connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import TYPE_CHECKING, Any, Final

from daemon.mqtt.codec import ProtocolError

if TYPE_CHECKING:
    from daemon.mqtt.connection import Connection, ConnectParams

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER: Final = 16_384
_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA


def _mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, client-masked frame (RFC 6455 5.2)."""
    n = len(payload)
    head = bytes((0x80 | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65_536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class _FramingTransport(asyncio.WriteTransport, asyncio.ReadTransport):
    """What the MQTT connection writes to: frames it, passes the rest through."""

    def __init__(self, raw: asyncio.Transport) -> None:
        super().__init__()
        self._raw = raw

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._raw.write(frame(_OP_BINARY, bytes(data)))

    def close(self) -> None:
        if not self._raw.is_closing():
            self._raw.write(frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._raw.is_closing()

    def pause_reading(self) -> None:
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._raw.get_extra_info(name, default)


class WebSocketProtocol(asyncio.Protocol):
    """The socket's protocol: HTTP upgrade, then frames to and from ``inner``."""

    def __init__(self, inner: Connection, host: str, port: int, path: str) -> None:
        self._inner = inner
        self._request_target = (host, port, path or "/")
        self._key = base64.b64encode(os.urandom(16))
        self._raw: asyncio.Transport | None = None
        self._buffer = b""
        self._upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        host, port, path = self._request_target
        if ":" in host:
            host = f"[{host}]"  # an IPv6 literal
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
        transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"websocket closed during upgrade: {exc}"))
        if self._upgraded:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            if not self._upgraded:
                self._upgrade()
            if self._upgraded:
                self._frames()
        except ProtocolError as exc:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(str(exc)))
            assert self._raw is not None
            self._raw.abort()

    def _upgrade(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEADER:
                raise ProtocolError("websocket upgrade response too long")
            return
        head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
        status, *lines = head.split("\r\n")
        if " 101 " not in status + " ":
            raise ProtocolError(f"websocket upgrade refused: {status.strip()}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ProtocolError("websocket upgrade: wrong Sec-WebSocket-Accept")
        self._upgraded = True
        assert self._raw is not None
        self._inner.connection_made(_FramingTransport(self._raw))
        self.ready.set_result(None)

    def _frames(self) -> None:
        buf = self._buffer
        pos = 0
        payloads: list[bytes] = []
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                if len(buf) - head < 2:
                    break
                n = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif n == 127:
                if len(buf) - head < 8:
                    break
                n = int.from_bytes(buf[head : head + 8], "big")
                head += 8
            key = b""
            if b1 & 0x80:  # servers must not mask, but tolerate it
                key = buf[head : head + 4]
                head += 4
            if len(buf) - head < n:
                break
            payload = buf[head : head + n]
            if key:
                payload = _mask(payload, key)
            pos = head + n
            opcode = b0 & 0x0F
            if opcode in (_OP_BINARY, _OP_CONTINUATION, _OP_TEXT):
                payloads.append(payload)
            elif opcode == _OP_PING:
                assert self._raw is not None
                self._raw.write(frame(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                assert self._raw is not None
                self._raw.close()
        self._buffer = buf[pos:]
        if payloads:
            self._inner.data_received(b"".join(payloads))


async def open_websocket(conn: Connection, params: ConnectParams) -> None:
    """Connect ``conn`` to ``params``' broker over a (TLS) websocket."""
    loop = asyncio.get_running_loop()
    ws = WebSocketProtocol(conn, params.host, params.port, params.websocket_path)
    await loop.create_connection(
        lambda: ws,
        params.host,
        params.port,
        ssl=params.tls,
        server_hostname=params.host if params.tls else None,
    )
    try:
        await ws.ready
    except ConnectionError as exc:
        raise ConnectionError(f"websocket: {exc}") from exc
