"""A network cable between a client and the broker that a test can pull out."""

from __future__ import annotations

import asyncio


class Cable:
    """A TCP proxy in front of the broker: :meth:`pull` drops every connection
    through it and refuses new ones (a node on Wi-Fi losing the network),
    :meth:`plug` lets them through again.  ``async with`` opens it on a free port
    (:attr:`url` for a client's config)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.plugged = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"mqtt://{'127.0.0.1'}:{self.port}"

    async def __aenter__(self) -> Cable:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        self.pull()
        assert self._server is not None
        self._server.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def pull(self) -> None:
        self.plugged = False
        for writer in list(self._writers):
            writer.transport.abort()

    def plug(self) -> None:
        self.plugged = True

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.plugged:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        ends = {writer}
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            ends.add(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for end in ends:
                self._writers.discard(end)
                end.transport.abort()
            self._tasks.discard(task)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.transport.abort()
