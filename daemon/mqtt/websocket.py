"""MQTT over WebSocket (RFC 6455, subprotocol ``mqtt``) for ``ws://`` and ``wss://`` brokers.

A thin layer under :class:`~daemon.mqtt.connection.Connection`: it performs
the HTTP upgrade, then hands the connection the payload of every binary frame
(MQTT does not care where frames split the stream) and wraps what the
connection writes in masked binary frames.  Pings are answered; a close frame
closes the connection.

Payload bytes are passed on in the read that brought them, not when their
frame is whole: a 40 MB message in one frame costs one pass over its bytes,
where buffering the frame (``buffer += data``, then a slice) cost one pass
per read: quadratic, seconds of a blocked loop.  Only a frame header and a
control frame's payload (at most 125 bytes, RFC 6455 5.5) are ever held.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, Final

from daemon.mqtt.codec import ProtocolError
from daemon.mqtt.params import ConnectParams

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER: Final = 16_384
_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_MAX_CONTROL: Final = 125  # RFC 6455 5.5


def _mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    """``data`` XOR the masking ``key`` (RFC 6455 5.3), starting at byte
    ``offset`` of the key: a frame's payload may be unmasked piece by piece."""
    if not data:
        return data
    if offset:
        key = key[offset:] + key[:offset]
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

    def __init__(self, inner: asyncio.Protocol, host: str, port: int, path: str) -> None:
        self._inner = inner
        self._request_target = (host, port, path or "/")
        self._key = base64.b64encode(os.urandom(16))
        self._raw: asyncio.Transport | None = None
        self._response = bytearray()  # the upgrade response, until its end
        self._upgraded = False
        self._closing = False
        # The frame being read: a header still arriving, or its payload.
        self._head = bytearray()
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        self._mask_key = b""  # servers must not mask (RFC 6455 5.1), but it is tolerated
        self._mask_at = 0
        self._control = bytearray()  # a control frame's payload
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
        try:
            if not self._upgraded:
                data = self._upgrade(data)
            if data and not self._closing:
                self._frames(data)
        except ProtocolError as exc:
            if not self.ready.done():
                self.ready.set_exception(ConnectionError(str(exc)))
            assert self._raw is not None
            self._raw.abort()

    def _upgrade(self, data: bytes) -> bytes:
        """Read the upgrade response; what follows it (frames) is returned."""
        self._response += data
        end = self._response.find(b"\r\n\r\n")
        if end < 0:
            if len(self._response) > _MAX_HEADER:
                raise ProtocolError("websocket upgrade response too long")
            return b""
        head, rest = self._response[:end].decode("latin-1"), bytes(self._response[end + 4 :])
        self._response = bytearray()
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
        return rest

    def _frames(self, data: bytes) -> None:
        """Read frames from ``data``; the MQTT bytes found go to the connection at once."""
        out: list[bytes] = []
        pos = 0
        end = len(data)
        try:
            while pos < end:
                if self._remaining:
                    take = min(self._remaining, end - pos)
                    chunk = data if take == end else data[pos : pos + take]
                    pos += take
                    self._remaining -= take
                    if self._mask_key:
                        chunk = _mask(chunk, self._mask_key, self._mask_at)
                        self._mask_at = (self._mask_at + take) % 4
                    if self._opcode < 0x8:
                        out.append(chunk)
                        continue
                    self._control += chunk
                else:
                    pos = self._header(data, pos)
                    if self._remaining or self._head:  # payload, or the header, to come
                        continue
                if self._opcode >= 0x8 and not self._remaining:
                    self._on_control()
                    if self._closing:
                        break
        finally:  # what came before a bad frame is still the broker's
            if out:
                self._inner.data_received(out[0] if len(out) == 1 else b"".join(out))

    def _header(self, data: bytes, pos: int) -> int:
        """Read (the rest of) a frame header at ``pos``; the position after what was used."""
        head = self._head
        need = 2
        while True:
            if len(head) >= 2:
                b1 = head[1]
                n = b1 & 0x7F
                need = 2 + (2 if n == 126 else 8 if n == 127 else 0) + (4 if b1 & 0x80 else 0)
            if len(head) >= need:
                break
            take = min(need - len(head), len(data) - pos)
            if not take:
                return pos  # the header's end is in a later read
            head += data[pos : pos + take]
            pos += take
        b0, b1 = head[0], head[1]
        n = b1 & 0x7F
        at = 2
        if n == 126:
            n, at = int.from_bytes(head[2:4], "big"), 4
        elif n == 127:
            n, at = int.from_bytes(head[2:10], "big"), 10
        self._mask_key = bytes(head[at : at + 4]) if b1 & 0x80 else b""
        self._mask_at = 0
        opcode = b0 & 0x0F
        head.clear()
        if b0 & 0x70:
            raise ProtocolError("websocket frame with RSV bits set (no extension was agreed)")
        if opcode >= 0x8:
            if n > _MAX_CONTROL or not b0 & 0x80:
                raise ProtocolError("websocket control frame fragmented or over 125 bytes")
            self._control.clear()
        elif opcode == _OP_TEXT:
            raise ProtocolError("websocket text frame: MQTT travels in binary frames (6.0.0-1)")
        elif opcode not in (_OP_BINARY, _OP_CONTINUATION):
            raise ProtocolError(f"websocket frame with unknown opcode 0x{opcode:x}")
        self._opcode = opcode
        self._remaining = n
        return pos

    def _on_control(self) -> None:
        assert self._raw is not None
        payload = bytes(self._control)
        self._control.clear()
        opcode, self._opcode = self._opcode, _OP_BINARY
        if opcode == _OP_PING:
            self._raw.write(frame(_OP_PONG, payload))
        elif opcode == _OP_CLOSE:
            self._closing = True  # echo its status (RFC 6455 5.5.1), then close
            self._raw.write(frame(_OP_CLOSE, payload[:2]))
            self._raw.close()
        elif opcode != _OP_PONG:
            raise ProtocolError(f"websocket frame with unknown opcode 0x{opcode:x}")


async def open_websocket(conn: asyncio.Protocol, params: ConnectParams) -> None:
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
